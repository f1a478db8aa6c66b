#!/usr/bin/env bash
# The one prepared check for a session that is lent a GPU (README "GPU check"): the tests of
# training, evaluation and serving on CUDA, then the paper profile's ResNet-34 final fits (224 px,
# CUDA, bf16 autocast), grouped and random split, with their metrics, figures and times.
#
# From the repository root on the GPU machine:
#   DATA=.gpu-data/defungi OUT=results bash benchmarks/gpu_check.sh [extra `defungi train` options]
# A dry run here: DATA=../shared/defungi OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh --device cpu --epochs 1 --image-size 32
set -uo pipefail
data=${DATA:?set DATA to the DeFungi folder}
out=${OUT:?set OUT to the folder the results go to}
fit_limit=${FIT_LIMIT:-210}  # seconds per fit, so that all of it ends inside a 10-minute call; a fit stopped there says exit 124
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DEFUNGI_CACHE=${DEFUNGI_CACHE:-/tmp/defungi-cache}
mkdir -p "$out"
{
  "$py" -c 'import torch; print("torch", torch.__version__, "| CUDA:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
  # Optuna is not on the GPU image: the grid and study tests stay with CI.
  "$py" -m pytest -q -p no:cacheprovider tests --ignore=tests/experiments/test_curve_grid.py --ignore=tests/experiments/test_studies.py
  for split in grouped random; do
    run=/tmp/defungi-paper-$split
    start=$SECONDS
    timeout "$fit_limit" "$py" -m defungi.cli train --profile paper --model resnet34 --data "$data" --split "$split" --out "$run" "$@"
    echo "$split fit: exit $?, $((SECONDS - start)) s wall"
    for f in metrics.json training_curves.png confusion_test.png; do
      [ -f "$run/$f" ] && cp "$run/$f" "$out/$split-$f"
    done
  done
} 2>&1 | tee "$out/gpu_check.log"
