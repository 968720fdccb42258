#!/usr/bin/env bash
# bench/gpu.py in one go on a GPU machine that has Python, torch and torchvision but maybe none of dse's other
# dependencies, and no network: those install from wheels/ (fetch them beforehand, on a machine with network,
# with `make gpu-wheels`) into .venv-gpu, a venv that also sees the machine's own torch. Arguments go to
# bench/gpu.py, e.g. `bash bench/gpu.sh --parts 1 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c "import optuna, hydra, adabound, sqlalchemy, yaml, tqdm" 2>/dev/null; then
    [ -d .venv-gpu ] || "$python" -m venv --system-site-packages .venv-gpu
    python=.venv-gpu/bin/python
    "$python" -m pip install --quiet --no-index --find-links wheels optuna hydra-core adabound pyyaml tqdm
fi
exec "$python" bench/gpu.py "$@"
