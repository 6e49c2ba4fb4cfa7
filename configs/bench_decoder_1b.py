"""A 1.04B-parameter Llama-style decoder in bfloat16 for measuring MFU on one GPU (not a training recipe).

Sizes of Llama 3.2 1B except the vocabulary (32,000, a tokenizer-sized one instead of 128,256): d_model 2048,
16 layers, 32 query heads and 8 key/value heads of 64, d_ff 8192 (SwiGLU), tied embeddings, RoPE. Rows of 2,048
packed tokens, 4 rows a step; float32 parameters and AdamW state (16.6 GB), bfloat16 compute. The text is the
bundled Multi30k sample (both languages, one document per line), so the config runs in a fresh clone; what is
measured is the step, not the data.

Run (one GPU; `benchmarks/gpu_suite.py` runs it with the other GPU checks):
    crosswrite bench --config configs/bench_decoder_1b.py --steps 10 --warmup 3
"""

from pathlib import Path

import crosswrite_jax.data
from crosswrite_jax.config import Config, DataConfig, OptimizerConfig, TrainConfig
from crosswrite_jax.models.presets import llama

SAMPLE_DIR = str(Path(crosswrite_jax.data.__file__).parent)


def get_config() -> Config:
    return Config(
        name="bench_decoder_1b",
        task="causal_lm",
        model=llama(vocab_size=32000, d_model=2048, num_heads=32, num_kv_heads=8, head_dim=64, d_ff=8192,
                    num_decoder_layers=16, max_length=2048, rope_theta=500_000.0, tie_output_embedding=True,
                    dtype="bfloat16"),
        data=DataConfig(sources=("text:multi30k_sample/train.*.gz",), data_dir=SAMPLE_DIR, packing=True,
                        max_source_length=2048, max_target_length=2048, tokenizer_model="bpe"),
        optimizer=OptimizerConfig(learning_rate=3e-4, warmup_steps=100, schedule="cosine", b1=0.9, b2=0.95,
                                  eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0),
        train=TrainConfig(steps=20, batch_size=4, label_smoothing=0.0, eval_every=0, progress_bar=False),
    )
