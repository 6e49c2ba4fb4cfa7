"""T5 v1.1 XL (2.85B parameters) span-corruption pretraining on C4, on a TPU v4-128 slice (16 hosts x 4 chips).

Targets: v4-128 (64 chips in a 4x4x4 torus, 32 GiB HBM each); fsdp over all 64 chips, bfloat16 compute.
T5 v1.1 sizes: d_model 2048, 32 heads of 64, d_ff 5120 (gated GELU), 24+24 layers, vocabulary 32,128, untied
output layer; inputs of 512 tokens, targets of 114, 256 rows a step.

Run (creates the TPU, installs this checkout's commit on every worker, trains on all of them, streams
process 0's log; --delete removes the TPU afterwards):
    launch/tpu_pod.sh --name t5-xl --zone us-central2-b --accelerator v4-128 \
        --config configs/t5_xl_pod.py --workdir gs://YOUR_BUCKET/runs/t5_xl --delete
Check that it fits first (no TPU needed; measured with scanned layers: 20.66 of 32 GiB per chip (temporaries
20.28 GiB; 35% headroom), compiled in 102 s with 4.5 GB of host memory; unrolled, the compile needed more than
22 GB and was never measured; docs/PERFORMANCE.md):
    crosswrite compile-check --config configs/t5_xl_pod.py --topology v4-128
"""

import pod_common as common

from crosswrite_jax.config import Config, MeshConfig
from crosswrite_jax.models.presets import t5


def get_config() -> Config:
    return Config(
        name="t5_xl_pod",
        task="span_corruption",
        model=t5("1.1", vocab_size=32128, d_model=2048, num_heads=32, head_dim=64, d_ff=5120,
                 num_encoder_layers=24, num_decoder_layers=24, max_length=512, dropout_rate=0.0,
                 tie_output_embedding=False, dtype="bfloat16", scan_layers=common.SCAN_LAYERS),
        data=common.data("unigram", inputs_length=512, targets_length=114),
        optimizer=common.adafactor(learning_rate=1e-2, warmup_steps=10_000),
        train=common.train(steps=524_288, batch_size=256),
        checkpoint=common.checkpoint(),
        mesh=MeshConfig(shape=(1, -1, 1), rules="fsdp"),
    )
