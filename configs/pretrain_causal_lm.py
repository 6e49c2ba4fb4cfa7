"""Llama-style causal-LM pretraining on books + news, held-out perplexity on WikiText-2 validation.

Run (data from ../shared/data in a checkout; any folder holding pretrain_text/ works):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/pretrain_causal_lm.py \
        --workdir runs/pretrain_causal_lm
The same recipe trains a prefix LM (bidirectional attention over a random prefix, loss on the rest) with
--config.task=prefix_lm.
"""

import pretrain_common as common

from crosswrite_jax.config import Config
from crosswrite_jax.models.presets import llama


def get_config() -> Config:
    return Config(
        name="pretrain_causal_lm",
        task="causal_lm",
        # Llama layout (RoPE, RMSNorm, SwiGLU, grouped-query attention), 4 layers, d_model 256, untied output.
        model=llama(vocab_size=8000, d_model=256, num_heads=4, num_kv_heads=2, d_ff=768, num_decoder_layers=4,
                    max_length=128),
        data=common.data("bpe", inputs_length=128),
        optimizer=common.optimizer(),
        train=common.train(),
        checkpoint=common.checkpoint(),
    )
