#!/usr/bin/env bash
# bench/gpu.py in one go on a GPU machine that has Python, torch and torchvision but maybe none of dse's other
# dependencies, and no network: those install from wheels/ (fetch them beforehand, on a machine with network,
# with `make gpu-wheels`) into .venv-gpu, a venv that also sees the machine's own torch. `--tests` first runs
# the trainer's CUDA tests; other arguments go to bench/gpu.py, e.g. `bash bench/gpu.sh --tests --parts 1 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
tests=0
if [ "${1:-}" = "--tests" ]; then tests=1; shift; fi
python=${PYTHON:-python3}
if ! "$python" -c "import optuna, hydra, adabound, sqlalchemy, yaml, tqdm, pytest, pytest_timeout" 2>/dev/null; then
    [ -d .venv-gpu ] || "$python" -m venv --system-site-packages .venv-gpu
    python=.venv-gpu/bin/python
    "$python" -m pip install --quiet --no-index --find-links wheels optuna hydra-core adabound pyyaml tqdm pytest \
        pytest-timeout
fi
if [ "$tests" = 1 ]; then
    "$python" -m pytest -q -p no:cacheprovider tests/test_train.py -k "cuda or graph"
fi
exec "$python" bench/gpu.py "$@"
