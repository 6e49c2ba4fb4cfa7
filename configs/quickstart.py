"""Quickstart: English->German translation on the bundled Multi30k sample, on CPU, in minutes.

Run:
    crosswrite quickstart
or, equivalently, with any --config.KEY=VALUE overrides:
    crosswrite train --config configs/quickstart.py --workdir runs/quickstart
    crosswrite eval --workdir runs/quickstart --split test
"""

from crosswrite_jax.config import (CheckpointConfig, Config, DataConfig, EvalConfig, ModelConfig, OptimizerConfig,
                                   TrainConfig)


def get_config() -> Config:
    return Config(
        name="quickstart",
        model=ModelConfig(vocab_size=4000, d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3,
                          num_decoder_layers=3, dropout_rate=0.1),
        data=DataConfig(dataset="multi30k_sample", max_source_length=48, max_target_length=48,
                        bucket_lengths=(16, 24, 32, 48)),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=100, schedule="cosine"),
        train=TrainConfig(steps=1200, batch_size=64, eval_every=400, log_every=50),
        checkpoint=CheckpointConfig(every=400, max_to_keep=2),
        eval=EvalConfig(split="test", batch_size=200, max_decode_length=48),
    )
