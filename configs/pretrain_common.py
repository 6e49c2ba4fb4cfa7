"""Shared pieces of the pretraining recipes: the raw-text mixture and the held-out text.

Not a recipe itself. Paths are relative to data.data_dir (or $CROSSWRITE_DATA): point either at the
folder that holds pretrain_text/, e.g. CROSSWRITE_DATA=../shared/data.
"""

from crosswrite_jax.config import CheckpointConfig, DataConfig, OptimizerConfig, TrainConfig

# 13 Gutenberg books (1.06M words) and ABC rural + science news (0.66M words), one document per paragraph.
# Three of the files are Latin-1, hence the encoding fallback.
BOOKS = "text:pretrain_text/gutenberg/*.txt?document=paragraph&encoding=utf-8,latin-1"
NEWS = "text:pretrain_text/abc_news/*.txt?document=paragraph&encoding=utf-8,latin-1"
# WikiText-2 validation: held-out loss and perplexity, never trained on.
WIKITEXT2_VALID = "text:pretrain_text/wikitext2/wiki.valid.tokens"


def data(tokenizer_model: str, inputs_length: int = 128, targets_length: int = 128) -> DataConfig:
    """Books and news mixed 2:1, packed into rows, validated on WikiText-2."""
    return DataConfig(sources=(BOOKS, NEWS), mixture_weights=(2.0, 1.0), eval_sources=(WIKITEXT2_VALID,),
                      packing=True, max_source_length=inputs_length, max_target_length=targets_length,
                      tokenizer_model=tokenizer_model)


def optimizer(learning_rate: float = 1e-3, warmup_steps: int = 100) -> OptimizerConfig:
    return OptimizerConfig(learning_rate=learning_rate, warmup_steps=warmup_steps, schedule="cosine",
                           weight_decay=0.01)


def train(steps: int = 400, batch_size: int = 16, eval_every: int = 200) -> TrainConfig:
    """A CPU-sized run: held-out loss before, every `eval_every` steps and at the end."""
    return TrainConfig(steps=steps, batch_size=batch_size, label_smoothing=0.0, eval_every=eval_every,
                       eval_batches=40, eval_at_start=True, log_every=50)


def checkpoint(every: int = 200) -> CheckpointConfig:
    return CheckpointConfig(every=every, max_to_keep=2)
