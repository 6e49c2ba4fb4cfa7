"""WNUT-17 tagging with the encoder of this project's span-corruption T5: one backbone, many tasks (docs/RESULTS.md).

Run (first `crosswrite train --config configs/pretrain_span_corruption.py --workdir runs/pretrain_span_corruption`):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/finetune_ner_wnut17_t5.py --workdir runs/wnut17_t5
    CROSSWRITE_DATA=../shared/data crosswrite eval --checkpoint runs/wnut17_t5/best
Data, tags and schedule as finetune_ner_wnut17.py; inputs cut to the backbone's 128 positions.
"""

import finetune_common as common
import finetune_ner_wnut17

from crosswrite_jax.config import Config


def get_config() -> Config:
    return common.on_span_corruption_encoder(finetune_ner_wnut17.get_config(), "finetune_ner_wnut17_t5",
                                             finetune_ner_wnut17.STEPS, head="token_classification", num_labels=13)
