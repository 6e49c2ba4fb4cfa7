"""T5 v1.1 base (248M parameters) span-corruption pretraining on C4, on a TPU v5e-16 slice (4 hosts x 4 chips).

Targets: v5litepod-16 (4x4 chips, 16 GiB HBM each); parameters and optimizer state sharded over all 16 chips
(fsdp), bfloat16 compute. T5 v1.1 sizes: d_model 768, 12 heads of 64, d_ff 2048 (gated GELU), 12+12 layers,
vocabulary 32,128, untied output layer; inputs of 512 tokens, targets of 114, 128 rows a step.

Run (creates the TPU, installs this checkout's commit on every worker, trains on all of them, streams
process 0's log; --delete removes the TPU afterwards):
    launch/tpu_pod.sh --name t5-base --zone us-west4-a --accelerator v5litepod-16 \
        --config configs/t5_base_pod.py --workdir gs://YOUR_BUCKET/runs/t5_base --delete
Check that it fits first (no TPU needed; measured with scanned layers and Adafactor: 6.76 of 16 GiB per chip
(temporaries 6.64 GiB; 58% headroom), compiled in 71 s with 2.6 GB of host memory; unrolled under AdamW it was
5.4 GiB; docs/PERFORMANCE.md):
    crosswrite compile-check --config configs/t5_base_pod.py --topology v5e-16
"""

import pod_common as common

from crosswrite_jax.config import Config, MeshConfig
from crosswrite_jax.models.presets import t5


def get_config() -> Config:
    return Config(
        name="t5_base_pod",
        task="span_corruption",
        model=t5("1.1", vocab_size=32128, d_model=768, num_heads=12, head_dim=64, d_ff=2048, num_encoder_layers=12,
                 num_decoder_layers=12, max_length=512, dropout_rate=0.0, tie_output_embedding=False,
                 dtype="bfloat16", scan_layers=common.SCAN_LAYERS),
        data=common.data("unigram", inputs_length=512, targets_length=114),
        optimizer=common.adafactor(learning_rate=1e-2, warmup_steps=10_000),
        train=common.train(steps=524_288, batch_size=128),
        checkpoint=common.checkpoint(),
        mesh=MeshConfig(shape=(1, -1, 1), rules="fsdp"),
    )
