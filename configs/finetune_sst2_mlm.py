"""SST-2 sentiment from this project's own masked-LM encoder (configs/pretrain_mlm.py, then
configs/pretrain_mlm_tasks.py): the few-label curve.

Run (first configs/pretrain_mlm.py into runs/pretrain_mlm, then configs/pretrain_mlm_tasks.py into
runs/pretrain_mlm_tasks; their docstrings have the commands):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/finetune_sst2_mlm.py --workdir runs/sst2_mlm
With N of the 6,920 labeled sentences, drawn with a fixed seed (the same draw for every starting point):
    ... --config.data.max_train_examples=1000 --config.data.train_subset_seed=0 --config.train.seed=S
The same architecture and tokenizer from scratch:
    ... --config.train.init_from= --config.data.tokenizer=runs/pretrain_mlm/tokenizer
Data and schedule as finetune_sst2.py (432 steps of 32), AdamW at 3e-4.
"""

import finetune_common as common
import finetune_sst2

from crosswrite_jax.config import Config


def get_config() -> Config:
    return common.on_mlm_encoder(finetune_sst2.get_config(), "finetune_sst2_mlm", finetune_sst2.STEPS, 3e-4,
                                 head="classification", num_labels=2)
