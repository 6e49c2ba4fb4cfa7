"""Named architectures as ModelConfig switches: the three families on one set of layers."""

from __future__ import annotations

from dataclasses import replace

from crosswrite_jax.config import ModelConfig


def bert(**sizes) -> ModelConfig:
    """BERT: learned absolute positions, token types, post-LayerNorm, erf GELU, biases, tied MLM output."""
    base = ModelConfig(family="encoder", num_decoder_layers=0, activation="gelu", use_bias=True, norm="layernorm",
                       norm_position="post", norm_epsilon=1e-12, embedding_norm=True, position="learned",
                       max_length=512, type_vocab_size=2, pooler=True, scale_tied_output=False)
    return replace(base, **sizes)


def t5(version: str = "1.1", **sizes) -> ModelConfig:
    """T5: RMSNorm pre-norm, bucketed relative position bias; v1.0 ReLU, v1.1 gated GELU.

    T5 folds the 1/sqrt(head_dim) score scale into its query weights, which suits Adafactor's updates relative
    to each weight's size. Under AdamW's fixed step sizes that query, 8x smaller than its neighbours at head_dim
    64, would move 8x faster relative to its size; here the scale stays in the attention (scale_attention) and
    Hugging Face import / export folds it in and out of the query.
    """
    base = ModelConfig(family="encoder_decoder", norm="rmsnorm", norm_position="pre", norm_epsilon=1e-6,
                       position="relative", max_length=512, scale_attention=True, use_bias=False,
                       activation="relu" if version == "1.0" else "gelu_tanh", gated_mlp=version != "1.0",
                       tie_output_embedding=True, scale_tied_output=version == "1.0")
    return replace(base, **sizes)


def llama(**sizes) -> ModelConfig:
    """Llama: RoPE, RMSNorm pre-norm, SwiGLU, grouped-query attention, no biases, untied output."""
    base = ModelConfig(family="decoder", num_encoder_layers=0, norm="rmsnorm", norm_position="pre",
                       norm_epsilon=1e-5, position="rope", max_length=2048, activation="silu", gated_mlp=True,
                       use_bias=False, dropout_rate=0.0, tie_output_embedding=False, scale_tied_output=False)
    return replace(base, **sizes)
