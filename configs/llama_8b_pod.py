"""Llama 3 8B-like (8.03B parameters) causal-LM pretraining on C4, on a TPU v5p-256 slice (32 hosts x 4 chips).

Targets: v5p-256 (128 chips in a 4x4x8 torus, 95 GiB HBM each); 32-way fsdp times 4-way tensor parallelism
(heads, MLP and vocabulary split within groups of 4 chips), bfloat16 compute. Llama 3 8B sizes: d_model 4096,
32 layers, 32 query heads and 8 key/value heads of 128, d_ff 14336 (SwiGLU), vocabulary 128,256, untied output
layer, RoPE theta 500,000; rows of 2,048 tokens, 256 rows (0.5M tokens) a step. Layers scanned, each
rematerialized under the `dots` policy (matmul outputs kept, elementwise ops recomputed): scanned without remat,
every layer's attention probabilities stay alive at once (131 GiB of temporaries per chip, over the 95). The
output layer and loss run 256 positions at a time (train.logits_chunk_length): 1.3 GiB less per chip.

Run (creates the TPU, installs this checkout's commit on every worker, trains on all of them, streams
process 0's log; --delete removes the TPU afterwards):
    launch/tpu_pod.sh --name llama-8b --zone us-east5-a --accelerator v5p-256 \
        --config configs/llama_8b_pod.py --workdir gs://YOUR_BUCKET/runs/llama_8b --delete
Check that it fits first (no TPU needed; measured: 54.91 of 95 GiB per chip (42% headroom; 56.25 with unchunked
logits), compiled in 67 s with 2.1 GB of host memory; earlier, unrolled without remat it was 81.6 GiB, and that
batch on v5p-128 needed 120 GiB; docs/PERFORMANCE.md):
    crosswrite compile-check --config configs/llama_8b_pod.py --topology v5p-256
"""

import pod_common as common

from crosswrite_jax.config import Config, MeshConfig
from crosswrite_jax.models.presets import llama


def get_config() -> Config:
    return Config(
        name="llama_8b_pod",
        task="causal_lm",
        model=llama(vocab_size=128256, d_model=4096, num_heads=32, num_kv_heads=8, head_dim=128, d_ff=14336,
                    num_decoder_layers=32, max_length=2048, rope_theta=500_000.0, tie_output_embedding=False,
                    dtype="bfloat16", scan_layers=common.SCAN_LAYERS, remat="dots"),
        data=common.data("bpe", inputs_length=2048, targets_length=2048),
        optimizer=common.optimizer(learning_rate=3e-4, warmup_steps=2000),
        train=common.train(steps=100_000, batch_size=256, logits_chunk_length=256),
        checkpoint=common.checkpoint(),
        mesh=MeshConfig(shape=(1, -1, 4), rules="fsdp_tp"),
    )
