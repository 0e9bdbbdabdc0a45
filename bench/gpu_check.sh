#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) as one command for a GPU machine, under 8 minutes.
#
# The machine's own Python is used: wheels it lacks travel in .whl/ (see bench/README.md, "GPU
# check") and are installed to /tmp/site first. Results go to $OUT when it is set (the device
# tool's output folder), else bench/results/. Extra arguments go to gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 2; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
timeout 470 "$python" bench/gpu_check.py --out "$out" "$@"
