#!/usr/bin/env bash
# One round on the GPU machine (the `device` tool), as one call: install, then the named parts in order.
#
#   bash benchmarks/device_round.sh COMMIT PART [PART ...]
#
# Parts: tests (the GPU suite in parallel, less the `alone` tests), quick (those, less the quantized Llama tests,
# about half the suite's time), alone (the `alone` tests, one at a time), ops (op_overhead.py, with profiler traces
# of the tiny forwards), opsbase (op_overhead.py of an earlier commit unpacked in build/base, for an A/B in one
# call), hf (hf_decode.py), ab (graphs_ab.py), graphmem (bench_offload.py: time and peak memory of one chunked plan
# with and without graphs, 16 layers), grid (planner_grid.py, 32 layers), compile (cold and warm compile_time.py,
# 32 Llama-8B layers, one fresh Inductor cache), chunked (bench_offload.py: one slot with chunked copies against one
# and two slots, outputs checked), peers (bench_offload.py, peers compiled), large (large_model.py).
# Everything is written under $RESULTS (default /tmp/round) and packed into $OUT/round.tgz after each part (the
# tool brings back 8 files at most, and what a call cut at its time limit left); each part's output also goes
# to stdout, for the call's output_tail.
# Wheels the image lacks (diffusers, torchao) are carried in .whl/ (ignored by git).
set -uo pipefail
COMMIT=$1
shift
RESULTS=${RESULTS:-/tmp/round}
mkdir -p "$RESULTS"
export BENCH_COMMIT=$COMMIT PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" |
    tee -a "$RESULTS/device.txt"

part() {  # part NAME COMMAND...: run, log to $RESULTS/NAME.log, report its seconds and exit status
    local name=$1 began=$SECONDS
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$RESULTS/$name.log" | grep -v -E "^\s*$|Warning|warn\(" | tail -n 40
    echo "=== $name: rc=${PIPESTATUS[0]} in $((SECONDS - began)) s"
    mkdir -p "$OUT" && tar czf "$OUT/round.tgz" -C "$RESULTS" .
}

for name in "$@"; do
    case $name in
        tests) part gpu_tests_parallel python3 -m pytest tests/gpu -n 8 -m "not alone" -q -p no:cacheprovider --durations=5 ;;
        quick) part gpu_tests_quick python3 -m pytest tests/gpu -n 8 -m "not alone" -k "not quantized_llama" -q -p no:cacheprovider --durations=5 ;;
        alone) part gpu_tests_alone python3 -m pytest tests/gpu -m alone -q -p no:cacheprovider ;;
        ops) part op_overhead python3 benchmarks/op_overhead.py --profile --out "$RESULTS/ops" ;;
        opsbase) part op_overhead_base bash -c "cd build/base && BENCH_COMMIT=${BASE_COMMIT:-base} python3 benchmarks/op_overhead.py --out $RESULTS/ops_base" ;;
        hf) part hf_decode python3 benchmarks/hf_decode.py ${HF_ARGS:---layers 8 --tokens 24 --rounds 4 --prompts 2 --trace-tokens 4} --out "$RESULTS/hf" ;;
        graphmem) part graphs_memory python3 benchmarks/bench_offload.py --layers 16 --systems ours --fractions 2 \
                      --cases decode1,prefill2048 --prefetch-steps "" --chunked-steps 1 --cuda-graphs 0,1 --no-check \
                      --budget-s 200 --out "$RESULTS/graphmem" ;;
        ab) part graphs_ab python3 benchmarks/graphs_ab.py --layers 16 --rounds ${AB_ROUNDS:-10} --per-round 4 --out "$RESULTS/ab" ;;
        grid) part planner_grid python3 benchmarks/planner_grid.py --layers 32 --iters 6 --budget-s ${GRID_SECONDS:-280} --out "$RESULTS/grid" ;;
        compile)
            export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
            part compile_cold python3 benchmarks/compile_time.py --graph-cache --llama8b --layers 32 --skip-resident --out "$RESULTS/compile_cold"
            part compile_warm python3 benchmarks/compile_time.py --graph-cache --llama8b --layers 32 --skip-resident --out "$RESULTS/compile_warm"
            unset TORCHINDUCTOR_CACHE_DIR ;;
        chunked) part chunked python3 benchmarks/bench_offload.py --layers ${CHUNKED_LAYERS:-32} --systems resident,ours \
                     --fractions 2,4 --cases decode1,prefill2048 --prefetch-steps 1,2 --chunked-steps 1 --cuda-graphs 0 \
                     --budget-s ${CHUNKED_SECONDS:-400} --out "$RESULTS/chunked" ;;
        peers) part peers python3 benchmarks/bench_offload.py --layers 32 --systems resident,ours,diffusers,accelerate \
                   --peer-compile --fractions 2 --cases decode1,prefill2048 --prefetch-steps 1,2 --cuda-graphs 0 \
                   --no-check --out "$RESULTS/peers" ;;
        large) part large_model python3 benchmarks/large_model.py --source stream --iters 5 --warmup 2 --out "$RESULTS/large" ;;
        *) echo "unknown part $name" ;;
    esac
done
