#!/usr/bin/env bash
# Installs (scripts/setup.sh) and runs the test suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
# Two workers, one test module each at a time (--dist loadfile): module fixtures (a
# reference run that kills are compared against) are made once.
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -n 2 --dist loadfile tests "$@"
