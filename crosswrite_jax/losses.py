"""Token losses: summed (label-smoothed) loss, NLL, accuracy and token counts of a task's outputs, whole or in
position chunks, and the per-token figures they give."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from crosswrite_jax.models.transformer import LAYER_STACKS
from crosswrite_jax.tasks import Task

SUMS = ("loss_sum", "nll_sum", "correct", "tokens")


def token_losses(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                 label_smoothing: float) -> dict[str, jax.Array]:
    """Summed (label-smoothed) loss, NLL, correct tokens and token count over the weighted targets.

    Written without a one-hot target matrix or an argmax (each a full [..., V] pass that XLA:CPU runs slowly):
    the smoothed loss is (1 - e) NLL + (e / V) (V logsumexp - sum of logits), and a token is correct when no
    logit beats the target's (nor equals it at a lower id: argmax's first-index rule).
    """
    vocab = logits.shape[-1]
    on, off = 1.0 - label_smoothing, label_smoothing / vocab
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    logsumexp = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1)) + top[..., 0]
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    is_target = ids == targets[..., None]
    target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    nll = logsumexp - target_logit
    loss = on * nll + off * (vocab * logsumexp - jnp.sum(logits, axis=-1)) if label_smoothing else nll
    threshold = target_logit[..., None]
    beaten = (logits > threshold) | ((logits == threshold) & (ids < targets[..., None]))
    correct = jnp.logical_not(jnp.any(beaten, axis=-1)).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * weights), "nll_sum": jnp.sum(nll * weights),
            "correct": jnp.sum(correct * weights), "tokens": jnp.sum(weights)}


def zero_sums() -> dict[str, jax.Array]:
    """Zero sums to accumulate token losses into."""
    return {k: jnp.zeros((), jnp.float32) for k in SUMS}


def chunked_token_losses(project: Callable[[Any, jax.Array], jax.Array], params: Any, hidden: jax.Array,
                         targets: jax.Array, weights: jax.Array, label_smoothing: float,
                         chunk_length: int) -> dict[str, jax.Array]:
    """`token_losses` of `project(params, hidden)` computed `chunk_length` positions at a time.

    A scan over position chunks that holds one chunk's [B, chunk, V] logits at a time, never the whole
    [B, T, V]. Under differentiation the same scan also takes each chunk's gradients with respect to the head's
    parameters and to `hidden` as it goes (a custom VJP whose backward pass only scales them), so the output
    projection runs once forward and once backward, as without chunks, instead of being recomputed. Sums and
    gradients equal the unchunked ones up to float rounding. Only `loss_sum` is differentiable (it is what
    training minimises); the other sums are metrics. The layer stacks' parameters are not the head's:
    `project` must not use them.
    """
    rows, length = targets.shape
    count = -(-length // chunk_length)
    pad = count * chunk_length - length
    head = {k: v for k, v in params.items() if k not in LAYER_STACKS}
    stacks = {k: jax.lax.stop_gradient(v) for k, v in params.items() if k in LAYER_STACKS}

    def chunks(x):  # [B, T, ...] -> [count, B, chunk, ...]; padded positions carry zero weight
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.swapaxes(x.reshape((rows, count, chunk_length) + x.shape[2:]), 0, 1)

    def sweep(head, hidden, gradients: bool):
        def chunk_loss(head, h, t, w):
            sums = token_losses(project({**stacks, **head}, h), t, w, label_smoothing)
            return sums["loss_sum"], sums

        def body(carry, chunk):
            totals, head_grads = carry
            if not gradients:
                return (jax.tree.map(jnp.add, totals, chunk_loss(head, *chunk)[1]), None), None
            _, vjp, sums = jax.vjp(lambda p, h: chunk_loss(p, h, *chunk[1:]), head, chunk[0], has_aux=True)
            grads, hidden_grad = vjp(jnp.ones((), jnp.float32))
            return (jax.tree.map(jnp.add, totals, sums), jax.tree.map(jnp.add, head_grads, grads)), hidden_grad

        init = (zero_sums(), jax.tree.map(jnp.zeros_like, head) if gradients else None)
        (totals, head_grads), hidden_grads = jax.lax.scan(body, init, (chunks(hidden), chunks(targets),
                                                                       chunks(weights)))
        return totals, head_grads, hidden_grads

    @jax.custom_vjp
    def losses(head, hidden):
        return sweep(head, hidden, gradients=False)[0]

    def forward(head, hidden):
        totals, head_grads, hidden_grads = sweep(head, hidden, gradients=True)
        hidden_grads = jnp.swapaxes(hidden_grads, 0, 1).reshape((rows, count * chunk_length) + hidden.shape[2:])
        return totals, (head_grads, hidden_grads[:, :length])

    def backward(residuals, cotangents):
        head_grads, hidden_grad = residuals
        scale = cotangents["loss_sum"]
        return (jax.tree.map(lambda g: (scale * g).astype(g.dtype), head_grads),
                (scale * hidden_grad).astype(hidden_grad.dtype))

    losses.defvjp(forward, backward)
    return losses(head, hidden)


def task_losses(model: nn.Module, task: Task, variables: Any, batch: dict[str, jax.Array], deterministic: bool,
                rngs: dict, label_smoothing: float, logits_chunk_length: int = 0) -> dict[str, jax.Array]:
    """Summed token losses of one batch under the task's forward pass, chunked over positions if asked."""
    if logits_chunk_length and task.vocabulary_outputs:
        hidden, targets, weights = task.forward(model, variables, batch, deterministic, rngs, return_hidden=True)
        project = lambda params, h: model.apply({**variables, "params": params}, h, method="logits")  # noqa: E731
        return chunked_token_losses(project, variables["params"], hidden, targets, weights, label_smoothing,
                                    logits_chunk_length)
    logits, targets, weights = task.forward(model, variables, batch, deterministic, rngs)
    return token_losses(logits, targets, weights, label_smoothing)


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Per-token loss, NLL, perplexity and accuracy from summed metrics."""
    tokens = max(sums["tokens"], 1.0)
    nll = sums["nll_sum"] / tokens
    return {"loss": sums["loss_sum"] / tokens, "nll": nll, "perplexity": float(np.exp(min(nll, 50.0))),
            "accuracy": sums["correct"] / tokens, "tokens": sums["tokens"]}
