#!/usr/bin/env bash
# The GPU benchmark in one command (bench/gpu.py; bench/README.md, "GPU benchmark"):
#
#   bash bench/gpu.sh              # every CUDA check and benchmark, < 8 minutes on one H100/H200
#   bash bench/gpu.sh --dry-run    # every size shrunk, on a CPU (about a minute)
#   bash bench/gpu.sh --sections train_step,official_step
#
# Writes $OUT/gpu.json (+ gpu.md, gpu.log) when $OUT is set, else bench/results/gpu.json
# (gpu_dry_run.json with --dry-run). Before it: `bash bench/get_official.sh` (the official
# code for the official_step section, and the ml_collections wheel for machines without it).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
case " $* " in
    *" --dry-run "*) export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" ;;
    *) export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" ;;
esac
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
    wheel="$(ls bench/official/wheels/ml_collections-*.whl 2>/dev/null | head -n 1)"
    if [ -n "$wheel" ]; then
        site="${TMPDIR:-/tmp}/gpu_bench_site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel" \
            && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu.sh: ml_collections is not installed and bench/official/wheels has no wheel" \
             "(run bash bench/get_official.sh where pip works, and carry bench/official)" >&2
    fi
fi
exec "$PY" bench/gpu.py "$@"
