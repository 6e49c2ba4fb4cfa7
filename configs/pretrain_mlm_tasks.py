"""Task-adaptive masked-LM pretraining: configs/pretrain_mlm.py's encoder, continued on the unlabeled sentences of the
fine-tuning tasks' training splits (SST-2, CoNLL-2003) mixed with the books + news it started on.

The labels are never read: only the text column of sst2/train.tsv and the token column of the CoNLL-2003 training
sentences, the same text a few-label run has without its labels (Gururangan et al., 2020, "Don't Stop Pretraining":
task-adaptive pretraining). Dev / valid text is never trained on; WikiText-2 validation stays the held-out text.

Run (after `crosswrite train --config configs/pretrain_mlm.py --workdir runs/pretrain_mlm`):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/pretrain_mlm_tasks.py \
        --workdir runs/pretrain_mlm_tasks
The few-label recipes (configs/finetune_sst2_mlm.py, configs/finetune_ner_conll_mlm.py) start from it.
"""

import dataclasses

import pretrain_common as common
import pretrain_mlm

from crosswrite_jax.config import Config

STEPS = 1000
SST2_TRAIN_TEXT = "tsv:sst2/train.tsv?column=0"
CONLL_TRAIN_TEXT = "conll:ner/conll2003/train.txt?column=0"


def get_config() -> Config:
    base = pretrain_mlm.get_config()
    return dataclasses.replace(
        base,
        name="pretrain_mlm_tasks",
        # 6,920 SST-2 and 14,041 CoNLL sentences (about 0.1M and 0.2M words) each take a third of the rows; books and
        # news keep the last third so that the encoder does not forget its general text
        data=dataclasses.replace(base.data, sources=(SST2_TRAIN_TEXT, CONLL_TRAIN_TEXT, common.BOOKS, common.NEWS),
                                 mixture_weights=(1.0, 1.0, 2.0 / 3.0, 1.0 / 3.0)),
        optimizer=common.optimizer(learning_rate=1e-3, warmup_steps=100),
        train=dataclasses.replace(common.train(steps=STEPS, batch_size=32, eval_every=250),
                                  init_from="runs/pretrain_mlm"),
        checkpoint=common.checkpoint(every=250),
    )
