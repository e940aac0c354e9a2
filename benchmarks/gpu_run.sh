#!/usr/bin/env bash
# One command for the GPU measurement on a machine without network access:
#   bash benchmarks/gpu_run.sh [WHEEL_DIR] [OUT_DIR]
# WHEEL_DIR holds the wheels featcache imports that the GPU image lacks (zarr, numcodecs, donfig,
# google-crc32c, crc32c, typing_extensions, packaging...; see benchmarks/RESULTS.md). They are installed
# into a private folder put on PYTHONPATH, never into the system Python. Runs about 5 minutes on an
# H200; each figure is appended to OUT_DIR/extract_gpu.jsonl as soon as it is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-wheels}
OUT=${2:-bench-out}
PY=${PYTHON:-python}
SITE=$(mktemp -d /tmp/featcache-site-XXXX)
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import zarr, numcodecs, featcache.store.feature_store, featcache.extract.pipeline; print('imports ok: zarr', zarr.__version__)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3 || true
"$PY" benchmarks/extract_gpu.py --out "$OUT" "${@:3}"
