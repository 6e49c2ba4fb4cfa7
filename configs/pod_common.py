"""Shared pieces of the Cloud TPU pod recipes (*_pod.py): C4 from TFDS, cadence, optimizer.

Not a recipe itself. The TFDS data must be prepared beforehand as ArrayRecord files under the bucket
(`tfds build c4/en:3.1.0 --file_format=array_record --data_dir=gs://YOUR_BUCKET/tensorflow_datasets`);
replace YOUR_BUCKET, or override data.sources / data.eval_sources on the command line.
"""

from crosswrite_jax.config import CheckpointConfig, DataConfig, OptimizerConfig, TrainConfig

TFDS_DIR = "gs://YOUR_BUCKET/tensorflow_datasets"
C4_TRAIN = f"tfds:c4/en:3.1.0?split=train&field=text&data_dir={TFDS_DIR}"
C4_VALIDATION = f"tfds:c4/en:3.1.0?split=validation&field=text&data_dir={TFDS_DIR}"
# Every pod model scans its layers (model.scan_layers): XLA compiles one layer instead of 12-48, so compile time and
# program size stay flat with depth (benchmarks/scan_compile.py). No recipe here needs per-layer parameter names.
SCAN_LAYERS = True


def data(tokenizer_model: str, inputs_length: int, targets_length: int) -> DataConfig:
    """C4 English, packed rows; validation on C4's own validation split."""
    return DataConfig(sources=(C4_TRAIN,), eval_sources=(C4_VALIDATION,), packing=True,
                      max_source_length=inputs_length, max_target_length=targets_length,
                      tokenizer_model=tokenizer_model)


def train(steps: int, batch_size: int, logits_chunk_length: int = 0) -> TrainConfig:
    """A long run: logs every 100 steps, 20 held-out batches every 2,000, no per-step progress bar in pod logs;
    `logits_chunk_length` > 0: the output layer and loss a chunk of positions at a time (same loss, less memory)."""
    return TrainConfig(steps=steps, batch_size=batch_size, label_smoothing=0.0, eval_every=2000, eval_batches=20,
                       log_every=100, progress_bar=False, logits_chunk_length=logits_chunk_length)


def optimizer(learning_rate: float, warmup_steps: int, schedule: str = "cosine") -> OptimizerConfig:
    """AdamW as large-model (Llama) pretraining uses it: b2 0.95, decay 0.1, clipping at 1."""
    return OptimizerConfig(learning_rate=learning_rate, warmup_steps=warmup_steps, schedule=schedule, b1=0.9,
                           b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)


def adafactor(learning_rate: float = 1e-2, warmup_steps: int = 10_000) -> OptimizerConfig:
    """Adafactor as T5X pretrains T5: factored second moments, updates relative to each weight's scale and clipped
    at 1, no momentum, no weight decay or global-norm clipping; 1e-2 held for the warmup, then 1/sqrt(step) decay
    (the rsqrt schedule here ramps up linearly over the warmup instead of holding)."""
    return OptimizerConfig(name="adafactor", learning_rate=learning_rate, warmup_steps=warmup_steps,
                           schedule="rsqrt", weight_decay=0.0, grad_clip_norm=0.0)


def checkpoint() -> CheckpointConfig:
    return CheckpointConfig(every=2000, max_to_keep=3, async_save=True)
