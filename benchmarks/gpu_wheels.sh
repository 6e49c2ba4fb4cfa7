#!/usr/bin/env bash
# Downloads, into .whl/, the wheels benchmarks/gpu_suite.py needs on this project's lent GPU machine (Python 3.12;
# JAX, Flax, Optax, Orbax and tokenizers are installed there, grain and its two small dependencies are not).
# The machine reaches no network: carry .whl with the run (see benchmarks/gpu_suite.py's docstring).
#   benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl grain==0.2.18 array_record==0.8.6 portpicker
ls -l .whl
