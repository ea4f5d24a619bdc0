#!/usr/bin/env bash
# One device-machine call, run from the repo root: bash benchmarks/gpu_session.sh [sections...]
# Sections: env tests retest bench engine engine-check eva train profile ops launch kernels layer_norm attention splitk pdl
# (default: env tests bench profile ops). Everything is written under $OUT (or ./gpu_out). Each section has its own
# time limit so that one slow part cannot eat the call.
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
      # issue 14: `vitfast bench` for the issue's models at batch 1, 4, 8, 64 against timm eager / compile / graphs;
      # the details table's note and engine.jsonl (engine_choice, engine_tuning_ms, engine_skipped) record the
      # engine's choice per row. Every compiled provider compiles per batch size (tens of seconds each), so one call
      # holds two models (ENGINE_MODELS, default the first pair) to stay under ENGINE_LIMIT; rows are appended as they
      # finish, so a timeout keeps them. The four calls:
      #   ENGINE_MODELS="vit_small_patch16_224 vit_base_patch16_224"
      #   ENGINE_MODELS="vit_large_patch16_224 vit_base_patch16_384"
      #   ENGINE_MODELS="vit_large_patch14_clip_224 beitv2_base_patch16_224"
      #   ENGINE_MODELS="eva02_base_patch14_448 eva02_large_patch14_448"
      timeout ${ENGINE_LIMIT:-290} python3 -m vitfast.cli bench ${ENGINE_MODELS:-vit_small_patch16_224 vit_base_patch16_224} \
        --batch-sizes 1,4,8,64 --providers timm-eager,timm-compile,timm-graphs,vitfast-graphs --warmup 3 --reps 20 \
        --json "$OUT/engine.jsonl" 2>&1 | grep -v "first call \.\.\.\|^    median" | tail -60 ;;
    engine-check)
      # tuned without the compiled candidates (the engine section times those through vitfast bench): 16 compiles
      # of two compiled candidates would not fit the limit
      timeout 400 python3 benchmarks/gpu_engine_check.py --json "$OUT/engine_check.jsonl" --batch-sizes 1,8 \
        --backends tuned,kernels,kernels-sdpa,kernels-pdl,kernels-splitk,reference \
        --models vit_base_patch16_224,beitv2_base_patch16_224,eva02_base_patch14_448,eva02_large_patch14_448 \
        2>&1 | tail -45 ;;
    eva)
      # issue 13: EVA-02 inference against timm (batch 1 / 8 / 64; ENGINE_MODELS's last pair above, with the engine's
      # choice), then attention with RoPE at 8 x 16 x 1025 beside SDPA without it (the <= 1.15x target), ~5 min
      timeout ${EVA_LIMIT:-240} python3 -m vitfast.cli bench eva02_base_patch14_448 eva02_large_patch14_448 \
        --batch-sizes 1,8,64 --providers timm-eager,timm-compile,timm-graphs,vitfast-graphs --warmup 3 --reps 20 \
        --json "$OUT/eva.jsonl" 2>&1 | grep -v "first call \.\.\.\|^    median" | tail -30
      timeout 90 python3 -m pytest benchmarks/test_ops.py --benchmark-only -q -p no:cacheprovider \
        -k "gpu and attention and 1025 and not compile" --benchmark-json "$OUT/eva_attention.json" \
        --benchmark-columns median,iqr --benchmark-sort name 2>&1 | tail -25 ;;
    train)
      # issues 13 and 18: one optimizer step (bf16 autocast, AdamW), timm eager / compiled against the same timm model
      # patched (auto = PyTorch where no cell is measured, plus recomputation; triton = the kernels), peak memory in
      # the rows. TRAIN_MODELS / TRAIN_BATCH: ViT-B/16 and BEiT v2-B at 64, EVA-02-L/224 at 32 (a call each)
      timeout ${TRAIN_LIMIT:-280} python3 -m vitfast.cli bench ${TRAIN_MODELS:-vit_base_patch16_224} --train \
        --batch-sizes ${TRAIN_BATCH:-64} --providers timm-eager,timm-compile,timm-patched,timm-patched-triton,timm-patched-compile \
        --warmup 3 --reps 10 --json "$OUT/train.jsonl" 2>&1 | grep -v "first call \.\.\.\|^    median" | tail -30 ;;
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
      # "auto"'s training cells: where the kernels beat eager PyTorch at forward + backward in this run
      python3 -m benchmarks.training_table "$OUT/ops.json" --results "$OUT/training_table.md" 2>&1 | tail -12 ;;
    layer_norm)
      # Triton LayerNorm fwd + bwd vs PyTorch, bf16, (8200, 1024) and (12608, 768): rule 5 and times, ~1 min
      timeout 150 python3 benchmarks/gpu_layer_norm_check.py --json "$OUT/layer_norm.jsonl" 2>&1 | tail -10 ;;
    launch)
      # the launch cache on a real GPU (Triton 3.6 there): cached vs kernel[grid] results bitwise equal, host us per
      # eager call cache on / off / aten, without and with gradients; the native eager path (csrc/eager.cpp, built
      # first for the device's torch: ~1-2 min) against the Python path, and its own cuLaunchKernelEx launches against
      # Triton's launcher (VITFAST_DIRECT_LAUNCH=0), each bitwise against kernel[grid] (~3-4 min in all)
      timeout 300 python3 benchmarks/launch_cache_gpu_check.py --native --json "$OUT/launch_cache.jsonl" 2>&1 \
        | tail -10 ;;
    attention)
      # (not in the default list) 64 vs 128 forward query rows at N <= 256, and what the table gradient costs, ~1 min
      timeout 120 python3 benchmarks/attention_tiles.py --json "$OUT/attention_tiles.jsonl" 2>&1 | tail -20 ;;
    splitk)
      # (not in the default list) issue 14: proj / fc2 at ViT-B bs 1/4/8 and ViT-L bs 1, cuBLAS + layer_norm_residual
      # against split-K + layer_norm_residual_partials at every split count, inside CUDA graphs, ~30 s
      timeout 90 python3 benchmarks/gpu_split_k.py --json "$OUT/split_k.jsonl" 2>&1 | tail -40 ;;
    pdl)
      # issue 14: ViT-B/16 bs 1 with and without programmatic dependent launch (kernels-pdl vs kernels-sdpa): the
      # tuned engine's per-candidate replay times, bitwise equality of the two, interleaved replay timings; ~1 min
      timeout 120 python3 benchmarks/pdl_gpu_check.py --json "$OUT/pdl.jsonl" 2>&1 | tail -12 ;;
    kernels)
      # the kernel report's launches run on this GPU: measured time beside each floor (fraction of floor), ~3 min
      timeout 300 python3 -m benchmarks.kernel_report --gpu --gpu-peaks H200 --out-dir "$OUT" 2>&1 | tail -20 ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
