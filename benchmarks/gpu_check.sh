#!/usr/bin/env bash
# On a CUDA machine, in under 5 minutes: the quickstart in bf16-mixed (2 minutes of
# training, then the test split), throughput.py and moe_layer.py on the GPU. One summary
# line per check at the end; the full output of each is in $LOGS/<check>.log.
#
#   bash benchmarks/gpu_check.sh            (from the repository root, project installed)
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${LOGS:-logs/gpu_check}
mkdir -p "$LOGS"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 2

summary=()
check() {  # check NAME TIMEOUT_S COMMAND...: run it, keep its log, and one line from it
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  if timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1; then
    summary+=("$name: ok in $((SECONDS - start)) s: $(grep -E "${PATTERN[$name]}" "$LOGS/$name.log" | tail -1)")
  else
    summary+=("$name: FAILED (exit $?) after $((SECONDS - start)) s, see $LOGS/$name.log")
  fi
}
declare -A PATTERN=(
  [quickstart]="test/bleu"
  [throughput]="vs_nllb_top2="
  [moe_layer]="table1_max_gap="
)

check quickstart 150 bash -c "
  python train.py fit --config configs/task/translation.yaml --trainer.accelerator gpu --trainer.devices 1 \
    --trainer.precision bf16-mixed --trainer.max_time 00:00:02:00 --trainer.enable_progress_bar false \
    --trainer.logger.init_args.save_dir $LOGS --trainer.logger.init_args.version fit &&
  python train.py test --config configs/task/translation.yaml --trainer.accelerator gpu --trainer.devices 1 \
    --trainer.precision bf16-mixed --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir $LOGS \
    --trainer.logger.init_args.version test --ckpt_path $LOGS/translation/fit/checkpoints/last.ckpt"
check throughput 90 python benchmarks/throughput.py --device cuda --precision bf16-mixed --repeats 5
check moe_layer 60 python benchmarks/moe_layer.py --device cuda --repeats 10

printf '%s\n' "${summary[@]}"
