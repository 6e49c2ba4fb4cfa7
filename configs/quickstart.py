"""Quickstart: English->German translation on the bundled Multi30k sample, on CPU, in minutes.

Run:
    crosswrite quickstart
or, equivalently, with any --config.KEY=VALUE overrides:
    crosswrite train --config configs/quickstart.py --workdir runs/quickstart
    crosswrite eval --workdir runs/quickstart --split test
"""

from crosswrite_jax.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)


def get_config() -> Config:
    return Config(
        name="quickstart",
        # 6.5M parameters. No dropout: a run this short underfits, and dropout costs a third of a CPU step.
        model=ModelConfig(vocab_size=4000, d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3,
                          num_decoder_layers=3, dropout_rate=0.0),
        # Packed rows of 64 tokens (about 3 pairs each): little padding and a single compiled shape.
        data=DataConfig(dataset="multi30k_sample", packing=True, max_source_length=64, max_target_length=64),
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=100, schedule="cosine"),
        train=TrainConfig(steps=1000, batch_size=16, eval_every=500, eval_batches=8, log_every=50),
        checkpoint=CheckpointConfig(every=500, max_to_keep=2),
        eval=EvalConfig(split="test", batch_size=200, max_decode_length=64),
    )


def get_sweep() -> dict[str, str]:
    """The search space of `crosswrite sweep --config configs/quickstart.py` (docs/sweep.md)."""
    return {"optimizer.learning_rate": "log(3e-4,3e-3)", "optimizer.warmup_steps": "int(20,300)",
            "model.d_ff": "choice(512,1024,2048)"}
