"""Llama 3.2 1B-like (1.24B parameters) causal-LM pretraining on C4, on a TPU v5e-256 pod (64 hosts x 4 chips).

Targets: v5litepod-256 (16x16 chips, 16 GiB HBM each); fsdp over all 256 chips, bfloat16 compute. Llama 3.2 1B
sizes: d_model 2048, 16 layers, 32 query heads and 8 key/value heads of 64, d_ff 8192 (SwiGLU), vocabulary
128,256, tied embeddings, RoPE theta 500,000; rows of 2,048 tokens, 256 rows (0.5M tokens) a step:
one row per chip, as attention scores (no flash attention) take most of HBM. Layers scanned, each
rematerialized under the `dots` policy (matmul outputs kept, elementwise ops recomputed): scanned without remat,
every layer's attention probabilities stay alive at once (18.6 GiB of temporaries per chip, over the 16). The
output layer and loss run 256 positions at a time (train.logits_chunk_length), so a row's [2048, 128256] logits
never exist at once: 0.7 GiB less per chip.

Run (creates the TPU, installs this checkout's commit on every worker, trains on all of them, streams
process 0's log; --delete removes the TPU afterwards):
    launch/tpu_pod.sh --name llama-1b --zone us-west4-a --accelerator v5litepod-256 \
        --config configs/llama_1b_pod.py --workdir gs://YOUR_BUCKET/runs/llama_1b --delete
Check that it fits first (no TPU needed; measured: 11.78 of 16 GiB per chip (26% headroom; 12.50 with unchunked
logits), compiled in 71 s with 1.8 GB of host memory; earlier, unrolled without remat 11.5 GiB in 366 s with 5.0 GB;
4 rows per chip (v5e-64) needed 26.5 GiB unrolled; docs/PERFORMANCE.md):
    crosswrite compile-check --config configs/llama_1b_pod.py --topology v5e-256
"""

import pod_common as common

from crosswrite_jax.config import Config, MeshConfig
from crosswrite_jax.models.presets import llama


def get_config() -> Config:
    return Config(
        name="llama_1b_pod",
        task="causal_lm",
        model=llama(vocab_size=128256, d_model=2048, num_heads=32, num_kv_heads=8, head_dim=64, d_ff=8192,
                    num_decoder_layers=16, max_length=2048, rope_theta=500_000.0, tie_output_embedding=True,
                    dtype="bfloat16", scan_layers=common.SCAN_LAYERS, remat="dots"),
        data=common.data("bpe", inputs_length=2048, targets_length=2048),
        optimizer=common.optimizer(learning_rate=3e-4, warmup_steps=2000),
        train=common.train(steps=100_000, batch_size=256, logits_chunk_length=256),
        checkpoint=common.checkpoint(),
        mesh=MeshConfig(shape=(1, -1, 1), rules="fsdp"),
    )
