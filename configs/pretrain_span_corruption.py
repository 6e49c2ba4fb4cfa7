"""T5-style span-corruption pretraining on books + news, held-out loss on WikiText-2 validation.

Run (data from ../shared/data in a checkout; any folder holding pretrain_text/ works):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/pretrain_span_corruption.py \
        --workdir runs/pretrain_span_corruption
Inputs are 128 tokens with 15% of the text in spans of mean length 3 replaced by sentinels; the targets
(the dropped spans behind their sentinels) then take 29 tokens, so rows of 32 hold them.
The vocabulary also learns from both sides of Multi30k's training text (no pairs, and no pretraining on it), so
the translation recipe (finetune_mt_span_corruption.py) that starts here finds German words in it: learned on the
English corpus alone, German took 39 tokens a sentence against English's 16, and 'ß' or 'ä' were unknown.
"""

import dataclasses

import pretrain_common as common

from crosswrite_jax.config import Config
from crosswrite_jax.models.presets import t5


def get_config() -> Config:
    return Config(
        name="pretrain_span_corruption",
        task="span_corruption",
        # T5 v1.1 layout (gated GELU, RMSNorm, relative buckets), 3+3 layers, d_model 256, no dropout.
        model=t5("1.1", vocab_size=8000, d_model=256, num_heads=4, d_ff=768, num_encoder_layers=3,
                 num_decoder_layers=3, max_length=128, dropout_rate=0.0),
        data=dataclasses.replace(common.data("unigram", inputs_length=128, targets_length=32),
                                 tokenizer_sources=("text:multi30k/train.en", "text:multi30k/train.de")),
        optimizer=common.optimizer(),
        train=common.train(),
        checkpoint=common.checkpoint(),
    )
