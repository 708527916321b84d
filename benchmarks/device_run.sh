#!/bin/bash
# One entry point for the GPU machine: checks and timings by part, each under its own time limit, in one call.
#   bash benchmarks/device_run.sh PART...        parts in the order given; default: tests check generate tp
#   DRY_RUN=1 bash benchmarks/device_run.sh ...   print the commands only (here, on the CPU)
# A call runs at most 10 minutes: the parts' limits below say which fit together (tests 170 + check 400 fits;
# step alone takes 600). Each part writes into its own folder and leaves one archive, $OUT/PART.tgz (the device
# returns at most 8 files), plus its log on stdout. Wheels in .whl/ (pytest-xdist, execnet) are installed first when
# carried, so the GPU tests run in 8 processes.
#
#   tests     the GPU tests of the kernels, the GEMV, the latent write, continuous batching, the fp8 cache, the deferred
#             stop check
#   check     gpu_check.py: fixtures, absorbed vs expanded in bf16, static/compiled generate(), continuous batching
#   kernel    device_run_decode_kernel.sh: the decode kernel's quick table and sweep (issue 17)
#   step      gemv.py --sweep, then decode_step.py: the decode step against the floor (issue 16)
#   gemv      the GEMV's GPU tests, gemv.py at one row with its sweep, the MLRA-4 step at 1 x 16 (and without PDL)
#             and 16 x 32K (issue 16; 375 s)
#   generate  generate_interval.py: generate() against its compiled step (issue 16)
#   cb        continuous_batching.py: throughput, memory, 32K requests that fit (issue 23)
#   paged     paged_decode.py: the kernel on the latent pages in place against the gather it replaced (issue 23)
#   tp        tp_e2e.py at the machine's GPU count: split against unsplit, generate() included (issue 18)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device_run_out}
WORK=${WORK:-/tmp/device_run}
mkdir -p "$OUT" "$WORK"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests check generate tp)

exec 3>&1  # the script's stdout, where DRY_RUN prints (the parts redirect theirs into logs)
run() {  # run LIMIT_S COMMAND...: the command under its limit, or printed under DRY_RUN
  local limit=$1
  shift
  if [ -n "$DRY_RUN" ]; then
    echo "timeout $limit $*" >&3
  else
    timeout "$limit" "$@"
  fi
}

xdist=""
if [ -z "$DRY_RUN" ] && ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps \
    --no-compile --no-cache-dir --target /tmp/site .whl/*.whl; then
  export PYTHONPATH=/tmp/site
  xdist="-n 8"
fi
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 1)

for part in "${parts[@]}"; do
  dir="$WORK/$part"
  mkdir -p "$dir"
  start=$SECONDS
  echo "== $part"
  case $part in
    tests)
      run 170 python3 -m pytest tests/test_decode_kernel.py tests/test_decode_gemv.py tests/test_continuous_batching.py \
        tests/test_fp8_cache.py tests/test_deferred_stop_check.py tests/test_latent_write.py -q -rf -p no:cacheprovider $xdist \
        >"$dir/pytest_gpu.log" 2>&1
      ;;
    check)
      run 400 python3 benchmarks/gpu_check.py --out "$dir/gpu_check_h200" >"$dir/gpu_check.log" 2>&1
      ;;
    kernel)
      OUT="$dir" run 330 bash benchmarks/device_run_decode_kernel.sh
      ;;
    step)
      run 60 python3 benchmarks/gemv.py --sweep --out "$dir/gemv_h200" >"$dir/gemv.log" 2>&1
      run 530 python3 benchmarks/decode_step.py --stop-after-s 420 --out "$dir/decode_step_h200" >"$dir/decode_step.log" 2>&1
      ;;
    gemv)
      run 75 python3 -m pytest tests/test_decode_gemv.py -q -rf -p no:cacheprovider $xdist >"$dir/pytest_gemv.log" 2>&1
      run 70 python3 benchmarks/gemv.py --rows 1 --sweep --steps --rep-ms 10 --out "$dir/gemv_h200" >"$dir/gemv.log" 2>&1
      run 130 python3 benchmarks/decode_step.py --models mlra_4 --shapes 1x16 --compiled mlra_4:1x16 \
        --profile-shapes 1x16 --generate-models --no-warm-compile --variants gemv_without_pdl --replay-budget-s 0.5 \
        --replays 20 --stop-after-s 100 --out "$dir/decode_step_h200_1x16" >"$dir/decode_step_1x16.log" 2>&1
      run 100 python3 benchmarks/decode_step.py --models mlra_4 --shapes 16x32768 --compiled mlra_4:16x32768 \
        --profile-shapes 16x32768 --generate-models --no-warm-compile --variants --replay-budget-s 0.5 --replays 20 \
        --stop-after-s 50 --out "$dir/decode_step_h200_16x32k" >"$dir/decode_step_16x32k.log" 2>&1
      ;;
    generate)
      run 150 python3 benchmarks/generate_interval.py --stop-after-s 75 --out "$dir/generate_interval_h200" \
        >"$dir/generate_interval.log" 2>&1
      ;;
    cb)
      run 350 python3 benchmarks/continuous_batching.py --stop-after-s 240 --out "$dir/continuous_batching_h200" \
        >"$dir/continuous_batching.log" 2>&1
      ;;
    paged)
      run 150 python3 benchmarks/paged_decode.py --out "$dir/paged_decode_h200" >"$dir/paged_decode.log" 2>&1
      ;;
    tp)
      run 200 torchrun --nproc-per-node "$gpus" benchmarks/tp_e2e.py --variants mlra_4 --skip-llama --layers 8 \
        --batches 1 --prompts 32768 --replays 50 --generate --out "$dir/tp_e2e_h200x$gpus" >"$dir/tp_e2e.log" 2>&1
      ;;
    *)
      echo "unknown part '$part' (tests check kernel step gemv generate cb paged tp)" >&2
      exit 2
      ;;
  esac
  echo "$part: rc=$? in $((SECONDS - start)) s"
  if [ -z "$DRY_RUN" ]; then
    tail -n 15 "$dir"/*.log
    tar czf "$OUT/$part.tgz" -C "$dir" .
  fi
done
