"""Learning-rate schedules, the AdamW or Adafactor chain, and freezing by routing parameters through labels."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import optax

from crosswrite_jax.config import SCANNED_LAYERS, OptimizerConfig
from crosswrite_jax.errors import UserError

TRAIN, FREEZE = "train", "freeze"


def path_str(path: tuple) -> str:
    """'encoder/layer_0/mlp/wi/kernel' for a pytree key path."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def parameter_paths(params: Any) -> list[str]:
    """Slash-joined paths of every leaf."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def freeze_labels(params: Any, freeze: Sequence[str]) -> Any:
    """A tree of 'train' / 'freeze' labels: a leaf is frozen when a regex fully matches its path."""
    patterns = []
    for text in freeze:
        try:
            patterns.append((text, re.compile(text)))
        except re.error as error:
            raise UserError(f"config key 'optimizer.freeze': '{text}' is not a valid regex ({error})") from None
    used = {p: False for p in freeze}

    def label(path, _):
        name = path_str(path)
        for text, pattern in patterns:
            if pattern.fullmatch(name):
                used[text] = True
                return FREEZE
        return TRAIN

    labels = jax.tree_util.tree_map_with_path(label, params)
    unused = [p for p, hit in used.items() if not hit]
    if unused:
        example = parameter_paths(params)[0]
        raise UserError(
            f"config key 'optimizer.freeze': pattern '{unused[0]}' matches no parameter;"
            f" patterns match whole slash-joined paths such as '{example}'")
    return labels


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup then cosine, linear, inverse-square-root or constant."""
    peak, warmup = config.learning_rate, max(config.warmup_steps, 0)
    end = peak * config.end_learning_rate_ratio
    decay_steps = max(total_steps - warmup, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_learning_rate_ratio)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif config.schedule == "rsqrt":
        decay = lambda step: peak * (max(warmup, 1) / (step + max(warmup, 1))) ** 0.5  # noqa: E731
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _is_stacked(path: Any) -> bool:
    """Whether a parameter is one of model.scan_layers' stacked ones (a leading axis over the layers)."""
    return f"/{SCANNED_LAYERS}/" in f"/{path_str(path)}/"


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only, not on norm scales and biases (also when stacked by model.scan_layers)."""
    return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim - _is_stacked(path) >= 2, params)


def per_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` run on each layer of stacked parameters by itself (vmapped over their leading axis)."""
    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        return jax.vmap(inner.update)(updates, state, params)

    return optax.GradientTransformation(jax.vmap(inner.init), update)


def _adafactor(config: OptimizerConfig, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    """optax's Adafactor; stacked layers (model.scan_layers) take it layer by layer, as unrolled ones do: its
    factoring, relative step size and update clipping read each parameter's shape and scale."""
    def adafactor(mask: Callable[[Any], Any]) -> optax.GradientTransformation:
        return optax.adafactor(schedule, weight_decay_rate=config.weight_decay or None, weight_decay_mask=mask)

    def group(path: Any, _: Any = None) -> str:  # stacks of different depths are vmapped apart
        return path_str(path).split("/")[0] if _is_stacked(path) else "flat"

    groups = {group(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]} - {"flat"}
    if not groups:
        return adafactor(_decay_mask)
    within_layer = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)  # noqa: E731 (vmapped: no layer axis)
    transforms = {"flat": adafactor(_decay_mask), **{g: per_layer(adafactor(within_layer)) for g in groups}}
    return optax.multi_transform(transforms, lambda tree: jax.tree_util.tree_map_with_path(group, tree))


def make_optimizer(config: OptimizerConfig, params: Any, total_steps: int,
                   trainable: Callable[[str], bool] | None = None) -> tuple[optax.GradientTransformation, Any]:
    """The optimizer and its label tree; frozen leaves go to `set_to_zero` and hold no moments.

    A leaf is frozen when an `optimizer.freeze` regex matches its path or `trainable(path)` (the PEFT rule) is False.
    """
    schedule = learning_rate_schedule(config, total_steps)
    chain = []
    if config.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.name == "adafactor":
        chain.append(_adafactor(config, schedule, params))
    else:
        chain.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                                 weight_decay=config.weight_decay, mask=_decay_mask))
    labels = freeze_labels(params, config.freeze)
    if trainable is not None:
        labels = jax.tree_util.tree_map_with_path(
            lambda path, label: label if trainable(path_str(path)) else FREEZE, labels)
    tx = optax.multi_transform({TRAIN: optax.chain(*chain), FREEZE: optax.set_to_zero()}, labels)
    return tx, labels


def count_parameters(params: Any, labels: Any) -> dict[str, int]:
    """Trainable and frozen parameter counts."""
    counts = {TRAIN: 0, FREEZE: 0}
    for p, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
        counts[label] += int(p.size)
    return {"trainable": counts[TRAIN], "frozen": counts[FREEZE], "total": counts[TRAIN] + counts[FREEZE]}


def tree_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of a tree (shapes suffice; nothing is read)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
