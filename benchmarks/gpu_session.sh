#!/usr/bin/env bash
# One device-machine call, run from the repo root: bash benchmarks/gpu_session.sh [sections...]
# Sections: env tests retest bench engine profile ops kernels (default: env tests bench profile ops). Everything is written
# under $OUT (or ./gpu_out). Each section has its own time limit so that one slow part cannot eat the call.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
sections=${*:-env tests bench profile ops}
for section in $sections; do
  echo "=== $section $(date -u +%H:%M:%S)"
  case $section in
    env)
      python3 -c "import torch, triton, timm, sys; print(sys.version.split()[0], torch.__version__, triton.__version__, timm.__version__, torch.cuda.get_device_name())"
      nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader ;;
    tests)
      timeout 300 python3 -m pytest tests -m gpu -q -p no:cacheprovider -n 4 --timeout 200 -rfEs 2>&1 \
        | tee "$OUT/gpu_tests.log" | grep -v "^SKIPPED" | tail -60 ;;
    retest)
      timeout 240 python3 -m pytest tests -m gpu -q -p no:cacheprovider -n 4 --timeout 200 -rfEs \
        -k "compile or linear or engine or patch" 2>&1 | tee "$OUT/gpu_retest.log" | grep -v "^SKIPPED" | tail -30 ;;
    bench)
      timeout 200 python3 -m vitfast.cli bench vit_base_patch16_224 beitv2_base_patch16_224 eva02_large_patch14_448 \
        --batch-sizes 1,8 --providers timm-eager,timm-graphs,vitfast,vitfast-reference --warmup 5 --reps 30 \
        --json "$OUT/bench.jsonl" 2>&1 | grep -v "first call \.\.\." | tail -40 ;;
    eager)
      timeout 90 python3 -m vitfast.cli bench vit_base_patch16_224 eva02_base_patch14_448 --batch-sizes 1,8 \
        --providers vitfast,vitfast-reference --warmup 5 --reps 20 --json "$OUT/eager.jsonl" 2>&1 | tail -12 ;;
    final)
      timeout ${FINAL_LIMIT:-530} python3 -m vitfast.cli bench vit_base_patch16_224 eva02_large_patch14_448 \
        vit_small_patch16_224 beitv2_base_patch16_224 vit_large_patch16_224 eva02_base_patch14_448 \
        vit_large_patch14_clip_224 vit_base_patch16_384 --batch-sizes 1,4,8 \
        --providers timm-eager,timm-graphs,vitfast-graphs --warmup 5 --reps 30 --json "$OUT/bench_final.jsonl" 2>&1 \
        | grep -v "first call \.\.\.\|^    median" | tail -80 ;;
    engine)
      timeout 400 python3 benchmarks/gpu_engine_check.py --json "$OUT/engine.jsonl" --batch-sizes 1,8 \
        --backends tuned,kernels,kernels-sdpa,reference \
        --models vit_base_patch16_224,beitv2_base_patch16_224,eva02_base_patch14_448,eva02_large_patch14_448 \
        2>&1 | tail -45 ;;
    profile)
      # the engine's candidates by name (vitfast.engine.TUNING_CANDIDATES); EVA-02-L bs 8 is the row furthest behind
      for spec in "vit_base_patch16_224 1 vitfast-graphs:kernels" "eva02_large_patch14_448 8 vitfast-graphs:kernels-sdpa" \
        "eva02_large_patch14_448 8 timm-graphs"; do
        set -- $spec
        timeout 60 python3 benchmarks/profile_block.py "$1" --batch-size "$2" --provider "$3" \
          --json "$OUT/profile.jsonl" 2>&1 | tail -22
      done ;;
    ops)
      timeout 150 python3 -m pytest benchmarks/test_ops.py --benchmark-only -q -p no:cacheprovider \
        -k "gpu and not compile" --benchmark-json "$OUT/ops.json" --benchmark-columns median,iqr \
        --benchmark-sort name 2>&1 | tail -5
      python3 - "$OUT/ops.json" <<'PY'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    gbps = b.get("extra_info", {}).get("GB/s")
    print(f"{b['name'][12:]:<70} {b['stats']['median'] * 1e6:9.1f} us" + (f"  {gbps:7.0f} GB/s" if gbps else ""))
PY
      ;;
    attention)
      # (not in the default list) 64 vs 128 forward query rows at N <= 256, and what the table gradient costs, ~1 min
      timeout 120 python3 benchmarks/attention_tiles.py --json "$OUT/attention_tiles.jsonl" 2>&1 | tail -20 ;;
    kernels)
      # the kernel report's launches run on this GPU: measured time beside each floor (fraction of floor), ~3 min
      timeout 300 python3 -m benchmarks.kernel_report --gpu --gpu-peaks H200 --out-dir "$OUT" 2>&1 | tail -20 ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
