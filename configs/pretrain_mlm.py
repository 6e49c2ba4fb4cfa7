"""BERT-style masked-LM pretraining on books + news, held-out perplexity on WikiText-2 validation.

Run (data from ../shared/data in a checkout; any folder holding pretrain_text/ works):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/pretrain_mlm.py --workdir runs/pretrain_mlm
Fine-tune from it later with --config.train.init_from=runs/pretrain_mlm and, for a new head,
--config.train.init_exclude='classifier/.*,pooler/.*'.
"""

import pretrain_common as common

from crosswrite_jax.config import Config
from crosswrite_jax.models.presets import bert


def get_config() -> Config:
    return Config(
        name="pretrain_mlm",
        task="mlm",  # 15% of tokens predicted: 80% shown as <mask>, 10% as a random token, 10% unchanged
        # 4 layers, d_model 256 (about 5.9M parameters with an 8,000 WordPiece vocabulary), no dropout for a short run.
        model=bert(vocab_size=8000, d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=4, max_length=128,
                   head="mlm", dropout_rate=0.0,
                   # the head projects the first 40 masked positions of a row (19 expected of 128; more than 40 is a
                   # 5-sigma event), not all 128: a third of the output projection's work
                   mlm_max_predictions=40),
        data=common.data("wordpiece", inputs_length=128),
        optimizer=common.optimizer(),
        train=common.train(),
        checkpoint=common.checkpoint(),
    )
