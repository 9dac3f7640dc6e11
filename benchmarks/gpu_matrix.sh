#!/usr/bin/env bash
# xformers vs SDPA x ZeRO-0/2/3 x gradient checkpointing off/on, each through
# benchmarks/throughput.py on this machine's GPUs, written as one markdown table.
#
#   benchmarks/gpu_matrix.sh OUT.md [--config CFG] [--micro-batch N] [--gpus N] [--steps N] [-- OVERRIDES...]
#
# Defaults: configs/tic_debug.yaml, the config's micro-batch, every visible GPU, 20 timed steps.
# train.global_batch is set to micro-batch x GPUs, so each row times one step without gradient
# accumulation. OVERRIDES (dotted config keys) go to every run. Each run's output is kept in
# OUT.md.logs/; a run that fails (e.g. out of memory) becomes a "failed" row and the script exits
# 1 after writing the table. Without CUDA it exits 2 at once.
set -euo pipefail

usage() {
  echo "usage: $0 OUT.md [--config CFG] [--micro-batch N] [--gpus N] [--steps N] [-- OVERRIDES...]" >&2
  exit 2
}

root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
[ -x "$py" ] || py=python3

[ $# -ge 1 ] && [[ "$1" != -* ]] || usage
out="$1"
shift
config="$root/configs/tic_debug.yaml"
micro=""
gpus=""
steps=20
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) [ $# -ge 2 ] || usage; config="$2"; shift 2 ;;
    --micro-batch) [ $# -ge 2 ] || usage; micro="$2"; shift 2 ;;
    --gpus) [ $# -ge 2 ] || usage; gpus="$2"; shift 2 ;;
    --steps) [ $# -ge 2 ] || usage; steps="$2"; shift 2 ;;
    --) shift; overrides=("$@"); break ;;
    *) usage ;;
  esac
done
for n in ${micro:+"$micro"} ${gpus:+"$gpus"} "$steps"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_matrix.sh: $n is not a positive integer" >&2; exit 2; }
done

# "<device count> <name of GPU 0>", or 0 without CUDA; torch's import chatter goes to stderr.
probe=$("$py" -c '
import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(n, torch.cuda.get_device_name(0) if n else "")' 2>/dev/null | tail -n 1) || probe=0
visible="${probe%% *}"
if ! [[ "$visible" =~ ^[1-9][0-9]*$ ]]; then
  echo "gpu_matrix.sh: no CUDA device visible; it benchmarks GPUs only (use benchmarks/throughput.py on the CPU)" >&2
  exit 2
fi
gpu_name="${probe#* }"
gpus="${gpus:-$visible}"
if [ "$gpus" -gt "$visible" ]; then
  echo "gpu_matrix.sh: --gpus $gpus but only $visible CUDA devices are visible" >&2
  exit 2
fi
if [ -z "$micro" ]; then
  micro=$("$py" -c '
import sys
from trainer.config import load_config
print(load_config(sys.argv[1], ["data.root=unused"]).train.micro_batch)' "$config" 2>/dev/null | tail -n 1) || true
  [[ "$micro" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_matrix.sh: cannot read train.micro_batch from $config" >&2; exit 2; }
fi

launcher=("$py")
if [ "$gpus" -gt 1 ]; then
  deepspeed="$(dirname "$py")/deepspeed"
  [ -x "$deepspeed" ] || deepspeed=deepspeed
  launcher=("$deepspeed" --num_gpus "$gpus")
fi

logs="$out.logs"
mkdir -p "$logs"
runs=()
for attention in xformers sdpa; do
  for zero in 0 2 3; do
    for ckpt in off on; do
      log="$logs/${attention}_zero${zero}_ckpt-${ckpt}.log"
      runs+=("$log")
      echo "gpu_matrix.sh: $attention, ZeRO-$zero, checkpointing $ckpt -> $log" >&2
      checkpointing=false
      [ "$ckpt" = on ] && checkpointing=true
      # A failed run is recorded from its log by matrix_table.py, so the matrix carries on.
      "${launcher[@]}" "$root/benchmarks/throughput.py" --config "$config" --steps "$steps" \
        "model.attention=$attention" "deepspeed.zero_stage=$zero" "model.grad_checkpointing=$checkpointing" \
        "train.micro_batch=$micro" "train.global_batch=$((micro * gpus))" ${overrides[@]+"${overrides[@]}"} \
        >"$log" 2>&1 || true
    done
  done
done

commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
title="GPU matrix: $(basename "$config"), micro-batch $micro per GPU, $gpus x $gpu_name, $steps timed steps"
title="$title ($(date -u +%F), commit $commit)"
exec "$py" "$root/benchmarks/matrix_table.py" "$out" --title "$title" "${runs[@]}"
