#!/usr/bin/env bash
# ESD speed and memory on one GPU at SD v1.4 scale (random weights, 512 px, bf16), both paths,
# in well under 8 minutes. For a machine with no network whose Python has torch but not
# diffusers: first, on a machine with PyPI, `bash benchmarks/fetch_wheels.sh` fills .whl/,
# which travels with the repository; this script installs from there.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/esd-site .whl/*.whl
  export PYTHONPATH=/tmp/esd-site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
# ESD-x (the paper's style erasure) and ESD-u (nudity), 20 timed iterations per path after a warm-up.
timeout 220 python3 benchmarks/sd14_scale.py --device cuda --mixed_precision bf16 --ddim_steps 50 --iterations 20 --train_method xattn
timeout 170 python3 benchmarks/sd14_scale.py --device cuda --mixed_precision bf16 --ddim_steps 50 --iterations 10 --train_method noxattn
# ESD-u's fast path again with gradient checkpointing: the memory it saves and the time it costs.
timeout 70 python3 benchmarks/sd14_scale.py --device cuda --mixed_precision bf16 --ddim_steps 50 --iterations 5 --train_method noxattn --paths fast --gradient_checkpointing || true
