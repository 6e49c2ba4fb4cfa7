"""Summarization: translation's model and batches on (document, summary) pairs, scored with ROUGE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crosswrite_jax.tasks.base import HELD_OUT
from crosswrite_jax.tasks.seq2seq import Seq2SeqTask


@dataclass(frozen=True)
class Summarization(Seq2SeqTask):
    def generation_scores(self, hypotheses: list[str], references: list[list[str]],
                          config: Any = None) -> dict[str, Any]:
        from crosswrite_jax.metrics import summarization_scores

        return summarization_scores(hypotheses, references)


TASK = Summarization("summarization", output_key="summary", metrics=HELD_OUT + ("rouge1", "rouge2", "rougeL"),
                     example_fields=("source", "target"), example_formats=("tsv", "csv", "jsonl"),
                     example_spec="jsonl:scitldr/{split}.jsonl?source=source&target=target")
