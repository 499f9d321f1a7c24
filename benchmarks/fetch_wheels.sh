#!/usr/bin/env bash
# Download the wheels benchmarks/gpu.sh installs on a GPU machine without network (Python 3.12, x86-64).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 "importlib_metadata>=8" "zipp>=3.20"
ls .whl
