#!/usr/bin/env bash
# Everything this repository checks or measures on a GPU machine, stage by stage; each stage's
# full log (and JSON/PNG) goes to $OUT (default ./gpu-out), and its tail to stdout.
#
#   bash benchmarks/run_gpu.sh                      # tests nccl kernels shape
#   bash benchmarks/run_gpu.sh tests nccl           # tests/gpu: one GPU, then NCCL (2+ GPUs)
#   bash benchmarks/run_gpu.sh gpus                 # 30B shape over 1, 2 (and 4) GPUs
#   RAY_BUNDLE=.gpu/py312-ray OUT=$OUT bash benchmarks/run_gpu.sh tests   # install Ray first
#
# Stages: tests (tests/gpu but NCCL), nccl (the NCCL tests one by one), kernels (per-kernel
# tables of batch-1 and batch-32 steps, kernel ablations at both, the expert kernels, the exchange
# packing; SWEEP=--sweep adds the block-size sweeps), shape (Qwen3-30B-A3B shape on one GPU: HF vs ours, verify
# sweep), gpus (the same shape with experts over 1, 2 and 4 GPUs; writes a ~61 GB checkpoint to
# $CKPT), trace (8 layers of it on 1 and 2 GPUs, profiled on both sides, Chrome traces), probe
# (the same 8 layers unprofiled, beside another revision with BASE_DIR), batch1 (switch tests,
# batch-1 ablations and sweeps, 48 layers at batch 1 and 8), preload (session 18's queued
# opt-ins, measured at batch 1 and 8; none paid in session 19), targets (the open
# targets: batch 1 on one GPU, then the 2-GPU batch-32 ratio), boundaries (a kernel boundary
# with and without PDL against a grid barrier), sampling (verification's host and GPU time per
# call: greedy, sampled, top-k/top-p rows; the Triton draw against torch's), draft (a draft
# model's proposals by draft.py; 48 layers + that draft, drafts read after verification beside
# before), allreduce (the trunk replicas' per-layer sum:
# NCCL vs symmetric memory, and the layer end with NCCL vs peer sums), demo (the shipped demo
# pair), pair (the demo pair's plain / draft / n-gram engines in interleaved rounds by
# demo_pair.py, the deferred draft read and the defaults again beside; then the adaptive
# policy). STAGE_TIMEOUT bounds each stage (seconds, default 540).
# PEER_WAITS=1 (gpus, probe): each rank's waits for its peers per peer sum, printed per batch.
set -u
OUT=${OUT:-gpu-out}
CKPT=${CKPT:-/tmp/specmoe-bench-ckpt}
T=${STAGE_TIMEOUT:-540}
mkdir -p "$OUT"
# A machine without Ray: RAY_BUNDLE=<a copy of the team's py312-ray folder> installs it first.
if [ -n "${RAY_BUNDLE:-}" ] && [ ! -f /tmp/site/.done ]; then
  bash "$RAY_BUNDLE/install.sh" /tmp/site >"$OUT/install.log" 2>&1 && touch /tmp/site/.done
fi
[ -n "${RAY_BUNDLE:-}" ] && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
quiet() { grep -v -e '^DEBUG' -e 'Warning' -e 'warn(' "$1" | tail -n "$2"; }

for stage in "${@:-tests nccl kernels shape}"; do
  for s in $stage; do
    echo "== $s"
    case $s in
      tests)
        timeout "$T" python -m pytest -p no:logging -q --tb=short --durations=12 \
          -k "not nccl" tests/gpu tests/cpu/test_triton_kernels.py >"$OUT/tests.log" 2>&1
        quiet "$OUT/tests.log" 40 ;;
      nccl)
        # One process per NCCL test, each bounded by NCCL_TEST_TIMEOUT: on a hang, the test process
        # and its shard actors print every thread's stack (faulthandler, SIGABRT); their Ray logs
        # go to $OUT/nccl-ray-logs.tgz. First: which exchange sizes a CUDA graph captures.
        for reg in default 0; do
          ( [ $reg = 0 ] && export NCCL_GRAPH_REGISTER=0
            timeout 120 python benchmarks/nccl_capture.py 2>&1 | grep -E 'NCCL_GRAPH|rank 0' )
        done | tee "$OUT/nccl-capture.log"
        for t in $(grep -o '^def test_nccl[a-z_0-9]*' tests/gpu/test_gpu.py | cut -c5-); do
          PYTHONFAULTHANDLER=1 python -u -m pytest -s -q --tb=short -o log_cli=true \
            --log-cli-level=INFO "tests/gpu/test_gpu.py::$t" >"$OUT/$t.log" 2>&1 &
          pid=$!
          for _ in $(seq "${NCCL_TEST_TIMEOUT:-240}"); do sleep 1; kill -0 $pid 2>/dev/null || break; done
          if kill -0 $pid 2>/dev/null; then
            echo "$t: still running after ${NCCL_TEST_TIMEOUT:-240}s: stacks in $OUT/$t.log and Ray logs"
            pkill -ABRT -f 'ray::ExpertShard'; kill -ABRT $pid; sleep 5; kill -9 $pid 2>/dev/null
            pkill -9 -f 'ray::'; pkill -9 -f raylet; pkill -9 -f gcs_server
          fi
          wait $pid; echo "$t: rc $?"
          grep -E '(passed|failed|error)( |,).* in [0-9.]+s' "$OUT/$t.log" | tail -1
        done
        tar czf "$OUT/nccl-ray-logs.tgz" /tmp/ray/session_*/logs/worker-* 2>/dev/null ;;
      kernels)
        timeout "$T" python benchmarks/kernels.py --layers 4 --batch 1 32 --tq 1 4 ${SWEEP:-} >"$OUT/kernels.log" 2>&1
        quiet "$OUT/kernels.log" 120 ;;
      shape)
        timeout "$T" python benchmarks/gpu.py --shape qwen3-30b-a3b --batch 1 8 32 --new-tokens 64 \
          --hf-tokens 8 --repeats 2 --skip-demo --variants graphs ngram draft \
          --json "$OUT/shape.json" --png "$OUT/shape.png" >"$OUT/shape.log" 2>&1
        quiet "$OUT/shape.log" 45 ;;
      gpus)
        n=$(nvidia-smi -L | wc -l)
        g="1 2"; [ "$n" -ge 4 ] && g="1 2 4"
        timeout "$T" python -u benchmarks/gpu.py --shape qwen3-30b-a3b --batch 1 8 32 --new-tokens 64 \
          --skip-hf --skip-sweep --repeats ${REPEATS:-2} --skip-demo --variants graphs --gpus $g --save-dir "$CKPT" \
          --layout ${LAYOUT:-replicas-split-peer} ${PEER_WAITS:+--peer-waits} \
          --json "$OUT/gpus.json" --png "$OUT/gpus.png" >"$OUT/gpus.log" 2>&1
        quiet "$OUT/gpus.log" 45 ;;
      trace)
        # Where a step's time goes with and without shards: 8 layers of the 30B shape, tables
        # (engine and shard side) in trace.log, Chrome traces in traces.tgz.
        timeout "$T" python -u benchmarks/gpu.py --shape qwen3-30b-a3b --layers 8 --batch 1 32 --new-tokens 32 \
          --skip-hf --skip-sweep --repeats 1 --skip-demo --variants graphs --gpus 1 2 --profile \
          --profile-batch 32 --trace-dir /tmp/traces --save-dir /tmp/ck8 >"$OUT/trace.log" 2>&1
        tar czf "$OUT/traces.tgz" -C /tmp traces
        grep -E "batch|profile:|expert shard|forwards" "$OUT/trace.log" | tail -n 20 ;;
      probe)
        # 8 layers of the 30B shape, 1 vs 2 GPUs at batch 1 and 32, no profiler: the working tree,
        # then (with BASE_DIR: a folder holding another revision's specmoe_ray, made here by
        # `bash benchmarks/base_copy.sh REV .gpu/base` and carried) that revision, then the tree
        # again: the spread of the two runs of the tree is the noise of the comparison.
        probe() { timeout "$T" python -u "$ROOT/benchmarks/gpu.py" --shape qwen3-30b-a3b --layers 8 --batch 1 32 \
          --new-tokens 32 --skip-hf --skip-sweep --repeats 1 --skip-demo --variants graphs --gpus 1 2 \
          --layout ${LAYOUT:-replicas-split-peer} ${PEER_WAITS:+--peer-waits} \
          --save-dir /tmp/ck8 2>&1 | grep -E "batch|copy band|peer sums"; }
        ROOT=$PWD
        echo "-- working tree"; probe | tee "$OUT/probe.log"
        if [ -n "${BASE_DIR:-}" ]; then
          echo "-- $BASE_DIR"; (cd "$BASE_DIR" && PYTHONPATH=$PWD${RAY_BUNDLE:+:/tmp/site} probe) | tee "$OUT/probe-base.log"
          echo "-- working tree again"; probe | tee "$OUT/probe-again.log"
        fi ;;
      batch1)
        # The batch-1 target's loop in one stage: every kernel switch == transformers (tests/gpu
        # switch test), the 4-layer ablations with the expert and one-row projection sweeps
        # (kernels.py (1)-(3)), then 48 layers with decode steps run ahead and with one sync each.
        timeout 300 python -m pytest -q tests/gpu -k switches >"$OUT/switches.log" 2>&1
        grep -E "passed|failed" "$OUT/switches.log" | tail -3
        timeout "$T" python benchmarks/kernels.py --layers 4 --batch 1 --tq 1 4 --skip-exchange --skip-sharded \
          >"$OUT/kernels-b1.log" 2>&1
        grep -E "^  B=|<- best|cuBLAS|engine batch" "$OUT/kernels-b1.log" | sed 's/, /\n    /g'
        # SWITCHES: gpu.py --switch arguments, shell-quoted (e.g. SWITCHES="--switch 'a:fused.MATVEC=False'
        # --switch again:"): those variants run beside graphs and sync in the same process.
        eval "switches=(${SWITCHES:-})"
        timeout 300 python benchmarks/gpu.py --shape qwen3-30b-a3b --batch 1 8 --new-tokens 64 --skip-hf \
          --skip-sweep --repeats 2 --skip-demo --variants graphs sync "${switches[@]}" --json "$OUT/b1.json" \
          >"$OUT/b1.log" 2>&1
        grep -E "batch|copy band" "$OUT/b1.log" ;;
      preload)
        # Session 18's queued opt-ins: a few rows' projections (PRELOAD_ROWS), the attention's first
        # past keys (ATTENTION_PRELOAD) and several tokens' down projection (DEDUP_DOWN_PRELOAD)
        # loaded before the PDL wait, the next layer's q/k/v read ahead into L2 (l2_ahead.MODE) now
        # that q/k/v preloads. CUDA kernel tests, the 4-layer ablations at batch 1 and 8 (T = 4:
        # verify steps), 48 layers at batch 1 and 8.
        timeout 200 python -m pytest -q -p no:logging tests/cpu/test_triton_kernels.py \
          -k "preload or decode_attention_kernel or norm_rope_and_cache or float64_reference" \
          >"$OUT/preload-tests.log" 2>&1
        tail -1 "$OUT/preload-tests.log"
        timeout 240 python benchmarks/kernels.py --layers 4 --batch 1 8 --tq 1 4 --skip-experts --skip-dense \
          --skip-exchange --skip-sharded --only "rows preloaded" "first past keys" "next q/k/v" "tokens' down" >"$OUT/preload-kernels.log" 2>&1
        grep -E "^  B=" "$OUT/preload-kernels.log" | sed 's/, /\n    /g'
        timeout 300 python benchmarks/gpu.py --shape qwen3-30b-a3b --batch 1 8 --new-tokens 64 --skip-hf \
          --skip-sweep --repeats 2 --skip-demo --variants graphs --gpus 1 --switch "rows8:triton_experts.PRELOAD_ROWS=8" \
          --switch "attention:triton_kernels.ATTENTION_PRELOAD=True" --switch "l2qkv:l2_ahead.MODE='qkv+1@attention'" \
          --switch "again:" \
          --json "$OUT/preload.json" >"$OUT/preload.log" 2>&1
        grep -E " batch" "$OUT/preload.log" ;;
      targets)
        # The two open targets on whatever machine was lent, in one stage: batch-1 decode
        # of the 48-layer shape on one GPU (>= 300 tok/s on an H100), then with 2 or more GPUs the
        # batch-32 ratio of 2 GPUs to one (>= 1.6x; writes the ~61 GB checkpoint to $CKPT first,
        # reused when present), each rank's peer waits printed.
        timeout 240 python -u benchmarks/gpu.py --shape qwen3-30b-a3b --batch 1 --new-tokens 64 --skip-hf \
          --skip-sweep --repeats 3 --skip-demo --variants graphs --gpus 1 --json "$OUT/target-b1.json" \
          >"$OUT/target-b1.log" 2>&1
        grep -E " batch|copy band" "$OUT/target-b1.log"
        if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
          timeout "$T" python -u benchmarks/gpu.py --shape qwen3-30b-a3b --batch 32 --new-tokens 64 --skip-hf \
            --skip-sweep --repeats 2 --skip-demo --variants graphs --gpus 1 2 --save-dir "$CKPT" \
            --layout replicas-split-peer --peer-waits --json "$OUT/target-b32.json" >"$OUT/target-b32.log" 2>&1
          grep -E " batch|copy band|peer|ready" "$OUT/target-b32.log"
        fi ;;
      boundaries)
        # What a dependent kernel boundary costs (PDL or not) against a grid barrier in one kernel.
        timeout 200 python benchmarks/boundaries.py 2>&1 | tee "$OUT/boundaries.log" | grep -E "phase" ;;
      sampling)
        # Verification's cost per call: host (launches) and GPU time, Triton draw vs torch.
        timeout 200 python benchmarks/sampling.py 2>&1 | tee "$OUT/sampling.log" | grep -E "k=" ;;
      draft)
        # A draft model's proposals (few-row steps preloaded vs cuBLAS, the defaults again), then
        # 48 layers + that draft with the drafts read after verification (opt-in) beside before,
        # and with the adaptive policy (acceptance 0: it should approach no speculation).
        timeout 300 python benchmarks/draft.py --batch 1 2 4 8 --switch cublas:fused.DRAFT_PRELOAD_ROWS=1 \
          --switch again: --json "$OUT/draft.json" 2>&1 | tee "$OUT/draft.log" | grep -E "batch"
        timeout "$T" python benchmarks/gpu.py --shape qwen3-30b-a3b --batch 1 4 8 --new-tokens 64 --skip-hf \
          --skip-sweep --repeats 2 --skip-demo --variants draft adaptive --switch draft-defer:engine.DEFER_DRAFT_READ=True \
          --switch draft-again: --json "$OUT/draft-defer.json" >"$OUT/draft-defer.log" 2>&1
        quiet "$OUT/draft-defer.log" 12 ;;
      allreduce)
        # The trunk replicas' per-layer sum at its sizes: NCCL vs symmetric memory (2 GPUs).
        timeout 300 python benchmarks/allreduce.py 2>&1 | tee "$OUT/allreduce.log" | grep -E "all_reduce|us" ;;
      pair)
        # The demo pair's host-bound speculative steps: plain / draft / n-gram side by side.
        timeout "$T" python benchmarks/demo_pair.py --batch 1 8 32 --switch defer:engine.DEFER_DRAFT_READ=True \
          --switch again: --json "$OUT/pair.json" >"$OUT/pair.log" 2>&1
        quiet "$OUT/pair.log" 12
        # The same with k chosen per step (the adaptive policy may turn a draft that does not pay off).
        timeout "$T" python benchmarks/demo_pair.py --batch 1 8 32 --spec-policy adaptive \
          --json "$OUT/pair-adaptive.json" >"$OUT/pair-adaptive.log" 2>&1
        quiet "$OUT/pair-adaptive.log" 4 ;;
      demo)
        timeout "$T" python benchmarks/gpu.py --skip-shape --batch 1 8 32 --new-tokens 64 --repeats 2 \
          --json "$OUT/demo.json" >"$OUT/demo.log" 2>&1
        quiet "$OUT/demo.log" 20 ;;
      *) echo "unknown stage $s (tests nccl kernels shape gpus trace probe batch1 preload targets boundaries sampling allreduce demo)"; exit 2 ;;
    esac
  done
done
