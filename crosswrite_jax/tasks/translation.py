"""Translation: sentence pairs, scored with sacreBLEU BLEU and chrF against the first reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crosswrite_jax.tasks.base import HELD_OUT
from crosswrite_jax.tasks.seq2seq import Seq2SeqTask


@dataclass(frozen=True)
class Translation(Seq2SeqTask):
    def generation_scores(self, hypotheses: list[str], references: list[list[str]],
                          config: Any = None) -> dict[str, Any]:
        from crosswrite_jax.metrics import translation_scores

        return translation_scores(hypotheses, [refs[0] for refs in references])


TASK = Translation("translation", output_key="translation", metrics=HELD_OUT + ("bleu", "chrf"),
                   example_fields=("source", "target"), example_formats=("tsv", "csv", "jsonl"),
                   example_spec="tsv:pairs/{split}.tsv?source=0&target=1")
