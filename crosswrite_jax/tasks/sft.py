"""Supervised fine-tuning (sft) of a decoder-only model on prompt -> response pairs.

Pairs come from the sources translation and summarization read (data.dataset's parallel files, or data.examples in
tsv, csv or jsonl); data.prompt_template puts each source into a prompt. A pair is one sequence, the prompt, then
the response and EOS, and only the response and its EOS carry loss; rows pack several sequences apart
(crosswrite_jax/data/prompts.py). Validation decodes the prompts with the KV cache and scores the responses with
eval.sft_metric: sacreBLEU BLEU and chrF, ROUGE, or exact match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crosswrite_jax.errors import UserError
from crosswrite_jax.tasks.base import HELD_OUT, Task, with_segments
from crosswrite_jax.tasks.pretraining import language_model

SCORES = {"sacrebleu": ("bleu", "chrf"), "rouge": ("rouge1", "rouge2", "rougeL"), "exact_match": ("exact_match",)}


@dataclass(frozen=True)
class PromptResponse(Task):
    """A decoder that reads a prompt and writes its response."""

    def prompts(self, config: Any, texts: list[str]) -> list[str]:
        return [config.data.prompt_template.format(source=text) for text in texts]

    def batch_features(self, inputs_length: int, targets_length: int) -> dict[str, int]:
        return {"targets": inputs_length + targets_length, "targets_prompt": inputs_length + targets_length}

    def batch_shapes(self, data: Any) -> dict[str, tuple[int, ...]]:
        """Rows of a prompt and a response at their maximum lengths, packed or not (no buckets)."""
        lengths = self.batch_features(data.max_source_length, data.max_target_length)
        return with_segments(lengths) if data.packing else {key: (n,) for key, n in lengths.items()}

    def check_config(self, config: Any, head_too: bool = False) -> None:
        """Also: no task head, rows (prompt and response lengths together) within the model's positions, and a
        train.best_metric that eval.sft_metric reports."""
        super().check_config(config, head_too)
        m, d = config.model, config.data
        if m.head != "none":
            raise UserError(f"task '{self.name}' writes text with a decoder's vocabulary outputs, but model.head is "
                            f"'{m.head}'; set --config.model.head=none")
        row = d.max_source_length + d.max_target_length
        if m.position in ("learned", "sinusoidal") and row > m.max_length:
            raise UserError(f"task '{self.name}' puts a prompt of data.max_source_length={d.max_source_length} and a "
                            f"response of data.max_target_length={d.max_target_length} tokens in one row of {row}, "
                            f"beyond model.max_length={m.max_length}; lower them or raise model.max_length")
        scorer = next((name for name, scores in SCORES.items() if config.train.best_metric in scores), None)
        if scorer not in (None, config.eval.sft_metric):
            raise UserError(f"config key 'train.best_metric' is '{config.train.best_metric}', a score of "
                            f"eval.sft_metric={scorer}, but it is '{config.eval.sft_metric}'; set "
                            f"--config.eval.sft_metric={scorer} or pick one of "
                            f"{', '.join(SCORES[config.eval.sft_metric] + HELD_OUT)}")

    def generation_scores(self, hypotheses: list[str], references: list[list[str]],
                          config: Any = None) -> dict[str, Any]:
        """eval.sft_metric's scores: sacrebleu (against the first reference), rouge or exact_match (the best)."""
        from crosswrite_jax import metrics

        metric = config.eval.sft_metric if config is not None else "sacrebleu"
        if metric == "rouge":
            return metrics.summarization_scores(hypotheses, references)
        if metric == "exact_match":
            return metrics.exact_match_scores(hypotheses, references)
        return metrics.translation_scores(hypotheses, [refs[0] for refs in references])


TASK = PromptResponse("sft", "decoder", language_model, ("targets",), generates=True, prompted=True,
                      output_key="response", metrics=HELD_OUT + tuple(m for ms in SCORES.values() for m in ms),
                      example_fields=("source", "target"), example_formats=("tsv", "csv", "jsonl"),
                      example_spec="jsonl:pairs/{split}.jsonl?source=source&target=target")
