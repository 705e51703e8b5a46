#!/usr/bin/env bash
# pythae, the peer library the benchmarks compare with, in its own package folder: layered on
# vaelab's environment (it reuses that torch, numpy, scipy, pydantic), never installed into it.
#   bash benchmarks/setup_pythae.sh [folder]     (default ~/.cache/vaelab/bench-pythae-0.1.2)
set -euo pipefail
DIR=${1:-$HOME/.cache/vaelab/bench-pythae-0.1.2}
PY=${PYTHON:-python}
"$PY" -m pip install --quiet --no-deps --target "$DIR" "pythae==0.1.2" imageio
echo "pythae in $DIR"
