#!/usr/bin/env bash
# Create the benchmark virtualenv (default .venv-bench/ at the repo root) with this project,
# torchsde and k-diffusion, WITHOUT k-diffusion's heavy dependencies (torchvision, clip,
# wandb, accelerate, ...): bench/samplers.py imports only k_diffusion/sampling.py.
#
#   bash bench/setup_env.sh [VENV_DIR]
#   .venv-bench/bin/python bench/samplers.py --quick
#
# Order matters: torch goes in first (TORCH_SPEC, default torch==2.13.0, which on the
# project's machines is the CPU build from the local wheel store), so that nothing later
# pulls the multi-GB CUDA build from PyPI. On a GPU machine, point pip at the CUDA wheels
# (e.g. PIP_INDEX_URL) or set TORCH_SPEC to the build you want.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-.venv-bench}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
KDIFF_SPEC=${KDIFF_SPEC:-k-diffusion==0.1.1.post1}

python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "$TORCH_SPEC"
"$PY" -m pip install --quiet -e .
# torchsde: k-diffusion's sampling.py imports it at module level (BrownianTree for the
# DPM-Solver++ SDE samplers); its own deps (numpy, scipy, trampoline) are light.
"$PY" -m pip install --quiet "torchsde>=0.2.5"
# k-diffusion itself without its dependencies (see bench/README.md).
"$PY" -m pip install --quiet --no-deps "$KDIFF_SPEC"
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
"$PY" bench/samplers.py --check-extra
