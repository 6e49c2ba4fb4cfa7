"""Initial parameter and activation statistics of this project's T5 against transformers' own T5 initialisation.

    python benchmarks/t5_init.py [--version 1.1] [--d-model 256]

Prints, for one batch of random ids: each parameter group's standard deviation (the query's with the score scale
folded in and the relative bias with its multiplier, as transformers stores them), the scale of the embedded
tokens, the initial logit spread and loss, and the share of the squared gradient norm that falls on the token
embedding. transformers' side uses T5ForConditionalGeneration with the same config (needs torch).
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from crosswrite_jax.models import presets
from crosswrite_jax.models.layers import relative_bias_multiplier
from crosswrite_jax.models.transformer import build_model


def _config(version: str, d_model: int):
    return presets.t5(version, vocab_size=4000, d_model=d_model, num_heads=4, d_ff=1024 if version == "1.0" else 768,
                      num_encoder_layers=3, num_decoder_layers=3, dropout_rate=0.0)


def _batch(vocab: int, seed: int = 0, batch: int = 16, length: int = 24):
    rng = np.random.default_rng(seed)
    return rng.integers(2, vocab, (batch, length)), rng.integers(2, vocab, (batch, length))


def _groups(path: str) -> str:
    for key in ("token_embed", "relative", "query", "key", "value", "out", "wi", "wo", "output", "norm"):
        if key in path:
            return key
    return path


def ours(config) -> dict[str, float]:
    """Statistics of this project's model at init."""
    from crosswrite_jax.losses import token_losses

    model = build_model(config)
    inputs, targets = _batch(config.vocab_size)
    params = jax.tree.map(lambda x: getattr(x, "value", x),
                          model.init(jax.random.key(0), jnp.asarray(inputs), jnp.asarray(targets))["params"],
                          is_leaf=lambda x: hasattr(x, "value"))
    stats: dict[str, list[float]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if leaf.ndim > 1 or "relative" in name:
            stats.setdefault(_groups(name), []).append(float(jnp.std(leaf)))
    out = {f"std {k}": float(np.mean(v)) for k, v in stats.items()}
    if config.scale_attention:  # the score scale applied in attention is folded into transformers' query
        out["std query"] /= math.sqrt(config.d_model // config.num_heads)
    # The bias itself (stored table times its fixed multiplier), as transformers stores it.
    out["std relative"] *= relative_bias_multiplier(config)
    embedded = model.apply({"params": params}, jnp.asarray(inputs), method=lambda m, x: m.embedder(
        x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape)))
    out["embedded rms"] = float(jnp.sqrt(jnp.mean(embedded ** 2)))

    def loss_fn(p):
        logits = model.apply({"params": p}, jnp.asarray(inputs), jnp.asarray(targets))
        weights = jnp.ones(targets.shape, jnp.float32)
        sums = token_losses(logits, jnp.asarray(targets), weights, 0.0)
        return sums["loss_sum"] / sums["tokens"], logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    out["logit std"] = float(jnp.std(logits))
    out["initial loss"] = float(loss)
    total = optax_norm(grads)
    embed = optax_norm(grads["embed"]["token_embed"])
    out["grad norm"] = total
    out["embedding share of grad norm^2"] = (embed / total) ** 2
    return out


def optax_norm(tree) -> float:
    import optax

    return float(optax.global_norm(tree))


def transformers_side(config) -> dict[str, float]:
    """The same statistics of transformers' T5ForConditionalGeneration at its own init."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from crosswrite_jax.models.hf import config_to_hf

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**config_to_hf("t5", config)))
    inputs, targets = _batch(config.vocab_size)
    stats: dict[str, list[float]] = {}
    names = {"shared": "token_embed", "relative_attention_bias": "relative", ".q.": "query", ".k.": "key",
             ".v.": "value", ".o.": "out", "wi": "wi", ".wo.": "wo"}
    for name, p in model.named_parameters():
        for key, group in names.items():
            if key in name and (p.ndim > 1):
                stats.setdefault(group, []).append(float(p.detach().std()))
                break
    out = {f"std {k}": float(np.mean(v)) for k, v in stats.items()}
    out["embedded rms"] = float(model.shared(torch.as_tensor(inputs)).pow(2).mean().sqrt())
    result = model(input_ids=torch.as_tensor(inputs), labels=torch.as_tensor(targets))
    result.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    out["logit std"] = float(result.logits.std())
    out["initial loss"] = float(result.loss)
    out["grad norm"] = total
    out["embedding share of grad norm^2"] = float(grads["shared.weight"].pow(2).sum()) / total ** 2
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default="1.1", choices=("1.0", "1.1"))
    parser.add_argument("--d-model", type=int, default=256)
    args = parser.parse_args(argv)
    config = _config(args.version, args.d_model)
    a, b = ours(config), transformers_side(config)
    print(f"T5 v{args.version}, d_model {args.d_model}, uniform random ids (log vocab = {math.log(4000):.2f})")
    print("| statistic | crosswrite_jax | transformers |\n|---|---|---|")
    for key in sorted(set(a) | set(b)):
        print(f"| {key} | {a.get(key, float('nan')):.4g} | {b.get(key, float('nan')):.4g} |")


if __name__ == "__main__":
    main()
