"""SST-2 sentiment with the encoder of this project's span-corruption T5: one backbone, many tasks (docs/RESULTS.md).

Run (first `crosswrite train --config configs/pretrain_span_corruption.py --workdir runs/pretrain_span_corruption`):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/finetune_sst2_t5.py --workdir runs/sst2_t5
    CROSSWRITE_DATA=../shared/data crosswrite eval --checkpoint runs/sst2_t5/best
The same checkpoint serves finetune_mt_span_corruption.py and finetune_scitldr.py with all of it, and
finetune_ner_wnut17_t5.py with its encoder; a fresh pooler and classifier read the mean state of the real
tokens. Data and schedule as finetune_sst2.py.
"""

import finetune_common as common
import finetune_sst2

from crosswrite_jax.config import Config


def get_config() -> Config:
    return common.on_span_corruption_encoder(finetune_sst2.get_config(), "finetune_sst2_t5", finetune_sst2.STEPS,
                                             head="classification", num_labels=2)
