#!/usr/bin/env bash
# Installs diffgentor with the DeepGen stack into .venv and runs the main job on the embedded default:
# one t2i and one edit job, in-process, SQLite job table and a local artifact folder under $DG_HOME
# (default ~/.diffgentor). With DG_DEEPGEN_* set it uses the real model; without, a tiny random-weight model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# On a CPU-only machine this takes the local CPU wheel; on a GPU host install your CUDA torch first.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[deepgen]"
HF_HUB_OFFLINE=1 .venv/bin/diffgentor demo "$@"
