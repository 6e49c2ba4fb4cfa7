#!/usr/bin/env bash
# Single-GPU debugging run: the same `crosswrite train` as everywhere, with XLA settings that suit one GPU.
#   launch/gpu.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
# Needs a CUDA build of jax in the environment: pip install -U "jax[cuda12]"
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: launch/gpu.sh CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
# Let XLA allocate on demand (easier to share a debugging GPU) and use its faster GPU collectives/latency scheduler.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
python -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', f'no GPU visible to jax: {d}'" || exit 2
exec crosswrite train --config "$config" --workdir "$workdir" --config.mesh.shape=-1,1,1 \
  --config.model.dtype=bfloat16 "$@"
