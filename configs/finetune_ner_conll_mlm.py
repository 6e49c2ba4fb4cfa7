"""CoNLL-2003 NER from this project's own masked-LM encoder (configs/pretrain_mlm.py, then
configs/pretrain_mlm_tasks.py; cased WordPiece).

Run (first configs/pretrain_mlm.py into runs/pretrain_mlm, then configs/pretrain_mlm_tasks.py into
runs/pretrain_mlm_tasks; their docstrings have the commands):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/finetune_ner_conll_mlm.py --workdir runs/conll_mlm
With N of the 14,041 training sentences, drawn with a fixed seed (the same draw for every starting point):
    ... --config.data.max_train_examples=2000 --config.data.train_subset_seed=0 --config.train.seed=S
The same architecture and tokenizer from scratch:
    ... --config.train.init_from= --config.data.tokenizer=runs/pretrain_mlm/tokenizer
Data and schedule as finetune_ner_conll.py (877 steps of 32), AdamW at 3e-4; entity F1 (seqeval) on valid.
"""

import finetune_common as common
import finetune_ner_conll

from crosswrite_jax.config import Config


def get_config() -> Config:
    return common.on_mlm_encoder(finetune_ner_conll.get_config(), "finetune_ner_conll_mlm", finetune_ner_conll.STEPS,
                                 3e-4, head="token_classification", num_labels=9)
