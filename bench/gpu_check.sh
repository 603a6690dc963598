#!/usr/bin/env bash
# The GPU measurements, for a lent GPU machine (the workplace's `device` tool). Measured on an H200 on
# 2026-11-27 (bench/RESULTS.md): the machine started in ~30 s; `probe mfu` took 287 s and `quant training`
# 395 s (with TRAIN_STEPS=20), so both fit one session's 15 minutes of device time, the second call made at
# once while the machine is warm. Prepare here:
#   bench/gpu_wheels.sh                                   # the packages its image lacks, into .whl/
# then run there:
#   device run: command="MFU_TIMEOUT=130 bash bench/gpu_check.sh probe mfu", carry=[".whl"], timeout_s=480
#   device run: command="TRAIN_STEPS=20 bash bench/gpu_check.sh quant training", carry=[".whl"], timeout_s=540
#   device run: command="bash bench/gpu_check.sh peft", carry=[".whl"], timeout_s=300   (not yet run: its time is a guess)
# Parts (all by default, else those named): probe (the machine and package versions), mfu (bench/mfu.py: a
# ~1B Llama under fsdp, zero2 and zero3 in bf16, and fsdp compiled in bf16 and fp8, those two profiled over their
# last 3 steps (trainer.profiling: where the time goes, by kind); MFU_VARIANTS, MFU_STEPS and
# MFU_TIMEOUT change what it runs, MFU_ARGS adds arguments; a variant's switches (bench/mfu.py) include :sac,
# selective activation checkpointing, and :rowwise, fp8's rowwise recipe: e.g.
# MFU_VARIANTS="fsdp:fp8:compile fsdp:fp8:compile:rowwise"), training
# (bench/precision.py: fp32, bf16, fp16 and fp8 with AdamW, then the fused optimizers in bf16, against fp32
# AdamW) and quant (the GPU chain, conf/chain/gpu.yaml: torchao int8 / int4 weight-only and 2:4 sparse kernels
# against the bf16 model), peft (bench/adapter_savings.py in bf16 on SmolLM2-135M's shape built from its config, the
# issue 19 table: full, LoRA and QLoRA peak memory, optimizer state, tokens/s; not yet run on a GPU). A part
# that fails does not stop the next. Results and one log go to $OUT (the
# device tool's; here bench/out/gpu): probe.txt, mfu.json, mfu_logs.txt, ops_VARIANT.txt (a profiled variant's
# op table), precision.json, compiled.json,
# optimizers.json, peft.json, evaluate.json, report.md, report.png, log.txt. They belong in bench/RESULTS.md with the
# date and the device.
#   bash bench/gpu_check.sh [probe] [mfu] [training] [peft] [quant]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench/out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(probe mfu training peft quant)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
log="$OUT/log.txt"

part() {  # part NAME COMMAND...: the command's output appended to log.txt, its last lines and time printed
  local name=$1 start=$SECONDS rc
  shift
  echo "=== $name: $*" | tee -a "$log"
  "$@" >>"$log" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$log"
  return $rc
}

for p in "${parts[@]}"; do
  case $p in
    probe)
      { nvidia-smi; "$PY" -c "import sys; print(sys.version)"
        for m in torch transformers datasets pyarrow torchao deepspeed bitsandbytes apex hydra; do
          "$PY" -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>&1 | tail -n 1
        done
        "$PY" -c "import torch; print('cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
      } >"$OUT/probe.txt" 2>&1
      cat "$OUT/probe.txt" ;;
    training)
      part precision "$PY" bench/precision.py --precisions fp32 bf16 fp16 fp8 --steps "${TRAIN_STEPS:-40}" --warmup 10 \
        --out "$OUT/precision.json"
      part fp8_compiled "$PY" bench/precision.py --precisions bf16 fp8 --compile --steps 40 --warmup 15 \
        --out "$OUT/compiled.json"
      part optimizers "$PY" bench/precision.py --precisions bf16 \
        --optimizers adam_deepspeed adamw_8bit adamw_apex lamb_apex --steps 40 --warmup 10 \
        --out "$OUT/optimizers.json"
      grep -A12 "^precision optimizer" "$log" ;;
    mfu)
      read -r -a variants <<<"${MFU_VARIANTS:-fsdp:bf16 zero2:bf16 zero3:bf16 fsdp:bf16:compile:profile fsdp:fp8:compile:profile}"
      read -r -a extra <<<"${MFU_ARGS:-}"
      part mfu "$PY" bench/mfu.py --variants "${variants[@]}" --steps "${MFU_STEPS:-20}" --warmup 5 \
        --timeout "${MFU_TIMEOUT:-180}" --out "$OUT/mfu.json" "${extra[@]}"
      for f in bench/out/mfu/*.log; do echo "--- $f"; tail -n 40 "$f"; done >"$OUT/mfu_logs.txt" 2>&1
      # mfu.json holds each profile's summary; the op tables come back too, the traces are too big to
      for d in bench/out/mfu/*/profile; do
        [[ -d $d ]] && cp "$d/rank0_ops.txt" "$OUT/ops_$(basename "$(dirname "$d")").txt"
      done
      grep -A18 "^variant" "$log" ;;
    peft)
      part peft "$PY" bench/adapter_savings.py --smollm2-shape --variants full lora qlora --steps "${PEFT_STEPS:-20}" \
        --warmup 5 --batch 8 --seq-len 1024 --eval-batches 2 --out-dir bench/out/peft_gpu \
        --set train.device=cuda precision=bf16
      cp bench/out/peft_gpu/results.json "$OUT/peft.json"
      grep -A12 "^variant" "$log" | tail -n 13 ;;
    quant)
      part chain "$PY" -m trainer.pipeline chain=gpu run_dir=bench/out/gpu_chain
      cp bench/out/gpu_chain/evaluate/results.json "$OUT/evaluate.json"
      cp bench/out/gpu_chain/report/report.md bench/out/gpu_chain/report/report.png "$OUT/"
      cat "$OUT/report.md" ;;
    *) echo "unknown part $p: choose probe, mfu, training, peft or quant" >&2; exit 2 ;;
  esac
done
