#!/usr/bin/env bash
# The one prepared check for a session that is lent a GPU (docs/development.md "GPU check"): the tests on CUDA
# (those whose libraries the machine lacks skip, saying so), a torchrun DDP fit over min(2, GPUs)
# processes on NCCL, then the paper profile's ResNet-34 final fits (224 px, CUDA, bf16 autocast),
# grouped and random split, each capped in time, with their metrics, figures and times.
#
# From the repository root on the GPU machine:
#   DATA=.gpu-data/defungi OUT=results bash benchmarks/gpu_check.sh [extra `defungi train` options]
# A dry run here: DATA=../shared/defungi OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh --device cpu --epochs 1 --image-size 32
set -uo pipefail
data=${DATA:?set DATA to the DeFungi folder}
out=${OUT:?set OUT to the folder the results go to}
fit_limit=${FIT_LIMIT:-150}  # seconds per fit, so that all of it ends inside a 10-minute call; a fit stopped there says exit 124
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DEFUNGI_CACHE=${DEFUNGI_CACHE:-/tmp/defungi-cache}
mkdir -p "$out"
{
  "$py" -c 'import torch; print("torch", torch.__version__, "| CUDA:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
  # test modules whose library the machine lacks (Optuna, onnxruntime, FastAPI, grad-cam) are left
  # out by tests/conftest.py, which names them in the header; the studies stay with CI.
  "$py" -m pytest -q -rs -p no:cacheprovider tests --ignore=tests/experiments/test_studies.py
  gpus=$("$py" -c 'import torch; print(max(1, min(2, torch.cuda.device_count())))')
  start=$SECONDS
  timeout 90 "$py" -m torch.distributed.run --nproc-per-node "$gpus" -m defungi train --profile paper \
    --model resnet34 --data "$data" --epochs 2 --out /tmp/defungi-ddp "$@"
  echo "DDP fit over $gpus process(es): exit $?, $((SECONDS - start)) s wall"
  [ -f /tmp/defungi-ddp/history.csv ] && cp /tmp/defungi-ddp/history.csv "$out/ddp-history.csv"
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
