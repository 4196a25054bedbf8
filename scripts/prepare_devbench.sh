#!/usr/bin/env bash
# Fill .devbench/ (git-ignored) with what scripts/gpu_bench.sh needs on the GPU machine, which
# reaches no network and has no diffusers: the plain diffusers + peft reference step (from
# ../shared/bench, which does not travel) and wheels for Python 3.12 / x86-64.
#
#   bash scripts/prepare_devbench.sh        # here, once (about 52 MB, under the 64 MiB carry limit)
#   then carry ".devbench" with the device run: see BENCHMARKS.md, "The GPU run".
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
mkdir -p .devbench/whl
cp "$SHARED"/bench/plain_step.py "$SHARED"/bench/plain_lowmem.py .devbench/
# Versions as tested on the CPU here; bitsandbytes is the largest (43 MB) and only the nf4/int8 rows need it.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .devbench/whl \
  diffusers==0.42.1 bitsandbytes==0.50.2 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
  typing-inspection==0.4.2 typing-extensions==4.16.0 importlib-metadata==10.2.0
ls -la .devbench .devbench/whl
du -sh .devbench
