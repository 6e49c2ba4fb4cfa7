"""Scores of the field: sacreBLEU BLEU and chrF on detokenized text, ROUGE, exact match, accuracy, F1."""

from __future__ import annotations

import sacrebleu


def translation_scores(hypotheses: list[str], references: list[str]) -> dict[str, object]:
    """Cased, detokenized corpus BLEU and chrF, with sacreBLEU signatures."""
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": round(bleu_score.score, 2),
        "chrf": round(chrf_score.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def _check_lengths(predictions: list, references: list) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def _percent(value: float) -> float:
    return round(float(value) * 100, 2)


def classification_scores(predictions: list[str], references: list[str]) -> dict[str, object]:
    """Accuracy and macro-averaged F1 (scikit-learn, over the labels in either list), in percent."""
    from sklearn.metrics import f1_score  # heavy: only needed here

    _check_lengths(predictions, references)
    if not references:
        return {"accuracy": 0.0, "macro_f1": 0.0, "examples": 0}
    correct = sum(p == r for p, r in zip(predictions, references))
    macro = f1_score(list(references), list(predictions), average="macro", zero_division=0)
    return {"accuracy": _percent(correct / len(references)), "macro_f1": _percent(macro),
            "examples": len(references)}


def entity_scores(predictions: list[list[str]], references: list[list[str]]) -> dict[str, object]:
    """Entity-level precision, recall and F1 (seqeval, conlleval-style BIO chunks; micro over entities), in percent.

    ``per_type`` holds the same for each entity type, with ``support`` the number of reference entities.
    """
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    _check_lengths(predictions, references)
    for i, (p, r) in enumerate(zip(predictions, references)):
        if len(p) != len(r):
            raise ValueError(f"example {i}: {len(p)} predicted tags for {len(r)} reference tags")
    predictions, references = [list(p) for p in predictions], [list(r) for r in references]
    report = classification_report(references, predictions, output_dict=True, zero_division=0) if references else {}
    per_type = {kind: {"precision": _percent(row["precision"]), "recall": _percent(row["recall"]),
                       "f1": _percent(row["f1-score"]), "support": int(row["support"])}
                for kind, row in sorted(report.items()) if not kind.endswith(" avg")}
    scores = {name: _percent(metric(references, predictions, zero_division=0)) if references else 0.0
              for name, metric in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score))}
    return {**scores, "per_type": per_type, "examples": len(references)}


def summarization_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, object]:
    """Mean ROUGE-1/2/L F-measure in percent (rouge_score, Porter stemmer), the best reference per example."""
    from rouge_score import rouge_scorer

    _check_lengths(hypotheses, references)
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for hypothesis, refs in zip(hypotheses, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError("an example has no reference")
        scores = scorer.score_multi(refs, hypothesis)
        for key in keys:
            totals[key] += scores[key].fmeasure
    count = len(hypotheses)
    return {**{key: _percent(totals[key] / count) if count else 0.0 for key in keys}, "examples": count}


def exact_match_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, object]:
    """Share of hypotheses equal to one of their references, whitespace runs counted as one space, in percent."""
    _check_lengths(hypotheses, references)
    matched = sum(" ".join(h.split()) in {" ".join(r.split()) for r in refs} for h, refs in zip(hypotheses, references))
    return {"exact_match": _percent(matched / len(hypotheses)) if hypotheses else 0.0, "examples": len(hypotheses)}
