#!/usr/bin/env bash
# Fine-tune lalic-s on a CUDA machine that has PyTorch but not this project's data, from the kit
# that `make gpu-kit` builds in .gpu/ (training tiles, two Kodak evaluation crops, wheels of the
# packages the trainer needs beyond torch, numpy, Pillow and tqdm). One command, time-bounded:
# it trains for MINUTES with the lr drop in the last 30 % of them and a moving average of the
# weights, then writes to OUT: weights.pt (float16 weight file of the moving average: --init for
# `lalic train`, or `python -m model.publish OUT/weights.pt` to publish), log.jsonl and train.log.
#
#   KIT=.gpu OUT=$OUT MINUTES=7 bash scripts/gpu_finetune.sh
#
# Every setting is an environment variable (defaults below); EXTRA holds more `lalic train` flags.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.gpu}
OUT=${OUT:-out/gpu}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-7}
STEPS=${STEPS:-1000000}
CROP=${CROP:-256}
BATCH=${BATCH:-16}
LR=${LR:-5e-5}
WARMUP=${WARMUP:-100}
EMA=${EMA:-0.999}
EVAL_EVERY=${EVAL_EVERY:-500}
shipped=(model/weights/lalic-s-*.pt)
INIT=${INIT:-${shipped[0]}}
PYTHON=${PYTHON:-python3}
EXTRA=${EXTRA:-}

if compgen -G "$KIT/wheels/*.whl" >/dev/null && ! "$PYTHON" -c "import constriction" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/lalic-site "$KIT"/wheels/*.whl
  export PYTHONPATH=/tmp/lalic-site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$OUT"
runs=$(mktemp -d)
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/train.log"; fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/train.log"
# shellcheck disable=SC2086  # EXTRA is a list of flags
PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-15} "$PYTHON" -m model.train \
  --device "$DEVICE" --data "$KIT/crops" --kodak "$KIT/kodak" --init "$INIT" \
  --runs-dir "$runs" --run gpu --crop "$CROP" --batch-size "$BATCH" --lr "$LR" --warmup "$WARMUP" \
  --drop-fraction 0.3 --ema "$EMA" --steps "$STEPS" --max-minutes "$MINUTES" \
  --eval-every "$EVAL_EVERY" --checkpoint-minutes 1000 --export "$OUT/weights.pt" $EXTRA 2>&1 | tee -a "$OUT/train.log"
cp "$runs/gpu/log.jsonl" "$OUT/log.jsonl"
rm -rf "$runs"
