#!/usr/bin/env bash
# Sets up .venv in the repository and installs mae3d into it, editable, with its native extension.
#   bash scripts/setup.sh          # runtime: torch (CPU build unless one is installed), triton,
#                                  # nibabel, matplotlib, the MNI152 template (from nilearn's wheel)
#   bash scripts/setup.sh dev      # + test and lint tools, scipy, dynamic-network-architectures
# Env: PYTHON (default python3), MAE3D_TORCH (default torch==2.13.0: an unpinned torch would pull
# a multi-GB CUDA build onto a CPU machine), MAE3D_SKIP_EXT=1 (no native build), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
extras=triton,data${1:+,$1}

[ -x .venv/bin/python ] || "$py" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q -U pip setuptools wheel
.venv/bin/python -c "import torch" 2>/dev/null || pip install -q "${MAE3D_TORCH:-torch==2.13.0}"
# the extension builds against the installed torch, so no build isolation (it would fetch another)
pip install -q ninja numpy
pip install -q --no-build-isolation -e ".[$extras]"
# --no-deps: mae3d reads the MNI152 template files shipped inside nilearn's wheel and never imports
# nilearn (its scientific stack is not needed); dynamic-network-architectures would pull timm and
# torchvision, i.e. a CUDA torch build, and is only used to check weight compatibility in the tests;
# MONAI (its SwinUNETR, for the fused-attention swap test) needs only torch and numpy.
pip install -q --no-deps nilearn
# nnunetv2 + batchgenerators (its only import on that path): nnU-Net's real weight loader and
# network builder for the export tests, without nnU-Net's scientific stack.
[ "${1:-}" != dev ] || pip install -q --no-deps dynamic-network-architectures einops monai \
  "nnunetv2>=2.8.1,<2.9" batchgenerators
.venv/bin/python -m mae3d.env
