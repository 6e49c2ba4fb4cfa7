"""Scores of the field: sacreBLEU BLEU and chrF on detokenized text."""

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
