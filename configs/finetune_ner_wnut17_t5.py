"""WNUT-17 tagging with the encoder of this project's span-corruption T5: one backbone, many tasks (docs/RESULTS.md).

Run (first `crosswrite train --config configs/pretrain_span_corruption.py --workdir runs/pretrain_span_corruption`):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/finetune_ner_wnut17_t5.py --workdir runs/wnut17_t5
    CROSSWRITE_DATA=../shared/data crosswrite eval --checkpoint runs/wnut17_t5/best
Data, tags and schedule as finetune_ner_wnut17.py; inputs cut to the backbone's 128 positions.
"""

import dataclasses

import finetune_common as common
import finetune_ner_wnut17

from crosswrite_jax.config import Config


def get_config() -> Config:
    base = finetune_ner_wnut17.get_config()
    return dataclasses.replace(
        base, name="finetune_ner_wnut17_t5",
        model=common.span_corruption_encoder(head="token_classification", num_labels=13),
        optimizer=common.adamw(5e-4, finetune_ner_wnut17.STEPS),
        train=dataclasses.replace(base.train, init_from=common.SPAN_CORRUPTION_RUN),
    )
