#!/usr/bin/env bash
# Installs (scripts/setup.sh) and runs the offline default end to end: a BonsaiNet
# search on Fashion-MNIST, final training, report and exports in runs/fmnist_quick.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python train/search.py --flagfile=train/configs/fmnist_quick.flags "$@"
