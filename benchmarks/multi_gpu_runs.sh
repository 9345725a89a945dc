#!/usr/bin/env bash
# Issue 16's measurements on one host of 4 or 8 GPUs (docs/benchmarks.md, docs/gpu_runs.md, docs/scaling.md): where
# a top-8 token reaches up to 8 ranks and per-expert dispatch sends 7/8 of its copies off the GPU. Each part fits in
# 10 minutes on 8 x H200; run them one at a time (NGPU: GPUs, default 8; per-node dispatch uses virtual nodes of
# NGPU/2 GPUs: 4 on 8):
#   bash benchmarks/multi_gpu_runs.sh ep-fine     ep_bench, DeepSeek-like and Qwen3-like rows (T=16384 per GPU), 3
#                                                 rounds: c2r per-expert / per-rank / per-node x contiguous / planned
#                                                 / load-capped / replicated, MegaBlocks' expert-parallel dMoE,
#                                                 DeepSpeed MoE, the raw all-to-all; ratios to MegaBlocks in one run
#   bash benchmarks/multi_gpu_runs.sh ep-mixtral  the same on the Mixtral-like row
#   bash benchmarks/multi_gpu_runs.sh cost        the cost model against measurements: ep_bench on NGPU/2 and NGPU
#                                                 GPUs (synthetic routing), `c2r-place simulate`'s model calibrated on
#                                                 the smaller run predicting the larger (benchmarks/simulate_check.py)
#   bash benchmarks/multi_gpu_runs.sh e2e         c2r-train of the ~1B fine-grained model (8 layers, d_model 2048, 64
#                                                 experts top-8) on NGPU GPUs under the deepspeed launcher: per-expert
#                                                 contiguous, profiled -> c2r-place plan (load cap 1.10, predicted
#                                                 step time) -> apply -> resumed per-rank + plan, against a control
#                                                 resumed from the same checkpoint as it was; tokens/s per GPU, MFU,
#                                                 losses, load (benchmarks/train_report.py), dashboards before/after
# SMOKE=1 runs any part on NGPU (default 4) CPU ranks over gloo with tiny sizes: the pipeline, not the speed.
# Needs megablocks and grouped_gemm importable on GPUs (README.md, 'GPU install'; or a prepared `.device/setup.sh`,
# sourced when present). Outputs under $OUT (default runs/multi_gpu/<part>).
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: multi_gpu_runs.sh ep-fine|ep-mixtral|cost|e2e}
case $PART in ep-fine | ep-mixtral | cost | e2e) ;; *) echo "multi_gpu_runs.sh: unknown part '$PART' (ep-fine, ep-mixtral, cost, e2e)" >&2; exit 2 ;; esac
SMOKE=${SMOKE:-0}
NGPU=${NGPU:-$([ "$SMOKE" = 1 ] && echo 4 || echo 8)}
GPN=$((NGPU / 2))  # GPUs per virtual node for per-node dispatch
[ "$SMOKE" != 1 ] && [ -f .device/setup.sh ] && { source .device/setup.sh >/dev/null || exit 1; }
[ "$SMOKE" = 1 ] && [ -x .venv/bin/python ] && export PATH=$PWD/.venv/bin:$PATH  # make setup's venv
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# the plans (ep_bench's planned and capped layouts, c2r-place plan) need Mt-KaHyPar: say so before any GPU minute
python -c "import mtkahypar" 2>/dev/null || { echo "multi_gpu_runs.sh: mtkahypar is not importable (pip install mtkahypar; for an offline GPU host run \`make device-wheels\` before the call)" >&2; exit 2; }
OUT=${OUT:-runs/multi_gpu/$PART}; mkdir -p "$OUT"
S=$(date +%s)
left() { echo $((570 - $(date +%s) + S)); }  # seconds left of a 10-minute call
bounded() { local l; l=$(left); l=$((l < $1 ? l : $1)); echo $((l < 1 ? 1 : l)); }  # never 0: timeout 0 is none
if [ "$SMOKE" = 1 ]; then
  export OMP_NUM_THREADS=1
  ON=(--device cpu --dtype float32); FINE=(tiny tiny-swiglu); MIXTRAL=(tiny); ITERS=(--rounds 1 --iters 2 --warmup 1)
else
  ON=(); FINE=(deepseek-like qwen3-like); MIXTRAL=(mixtral-like); ITERS=(--rounds 3 --iters 10)
fi
ep_bench() {  # ep_bench SECONDS RANKS ARGS...: at most SECONDS (and not past the call's end), on RANKS ranks
  local limit=$1 n=$2; shift 2
  timeout "$(bounded "$limit")" python -m torch.distributed.run --nproc_per_node "$n" \
    --master_port $((29600 + RANDOM % 300)) benchmarks/ep_bench.py "${ON[@]}" "${ITERS[@]}" "$@"
}
# one node: per-expert and per-rank dispatch over the plans of one level; then per-node dispatch over virtual nodes
# (two-level plans: nodes, then ranks), MegaBlocks again as the same run's yardstick
RANKS=(c2r-per-expert-contiguous c2r-per-expert-planned c2r-per-rank-contiguous c2r-per-rank-planned
  c2r-per-rank-capped c2r-per-rank-replicated megablocks-dmoe-ep raw-all-to-all)
NODES=(c2r-per-node-contiguous c2r-per-node-planned c2r-per-node-capped c2r-per-rank-planned megablocks-dmoe-ep)
# DeepSpeed's MoE last and alone (its own gate: router routing only): on 4 gloo CPU ranks it hangs in ep_bench (2
# run; not yet tried on 4+ GPUs), and a hang must not cost the other tables
PEERS=(deepspeed-moe-ep megablocks-dmoe-ep c2r-per-rank-planned)

case $PART in
ep-fine | ep-mixtral)
  if [ "$PART" = ep-fine ]; then CONFIGS=("${FINE[@]}"); else CONFIGS=("${MIXTRAL[@]}"); fi
  ep_bench 300 "$NGPU" --configs "${CONFIGS[@]}" --json "$OUT/$PART.json" \
    --contenders "${RANKS[@]}" > "$OUT/$PART.txt" 2> "$OUT/$PART.err"
  echo "== $PART on $NGPU GPUs rc $?"; grep "^|\|^ep_bench" "$OUT/$PART.txt"; tail -3 "$OUT/$PART.err"
  ep_bench 160 "$NGPU" --gpus-per-node "$GPN" --configs "${CONFIGS[@]}" \
    --json "$OUT/$PART-nodes.json" --contenders "${NODES[@]}" > "$OUT/$PART-nodes.txt" 2> "$OUT/$PART-nodes.err"
  echo "== $PART on $NGPU GPUs in nodes of $GPN rc $?"; grep "^|" "$OUT/$PART-nodes.txt"; tail -3 "$OUT/$PART-nodes.err"
  [ "$SMOKE" = 1 ] && PEERS=("${PEERS[@]:1}")
  ep_bench 600 "$NGPU" --configs "${CONFIGS[@]}" --routing router --json "$OUT/$PART-peers.json" \
    --contenders "${PEERS[@]}" > "$OUT/$PART-peers.txt" 2> "$OUT/$PART-peers.err"
  echo "== $PART peers on $NGPU GPUs rc $?"; grep "^|" "$OUT/$PART-peers.txt"; tail -3 "$OUT/$PART-peers.err"
  ;;
cost)
  C=(c2r-per-expert-contiguous c2r-per-rank-contiguous c2r-per-rank-planned c2r-per-node-planned single-device)
  for n in "$GPN" "$NGPU"; do
    ep_bench 280 "$n" --gpus-per-node "$((n / 2 > 0 ? n / 2 : 1))" --configs "${FINE[0]}" --routing synthetic \
      --json "$OUT/r$n.json" --contenders "${C[@]}" > "$OUT/r$n.txt" 2> "$OUT/r$n.err"
    echo "== ep_bench on $n GPUs rc $?"; grep "^|" "$OUT/r$n.txt"
  done
  timeout "$(bounded 120)" python benchmarks/simulate_check.py --calibrate-on "$OUT/r$GPN.json" \
    --predict "$OUT/r$NGPU.json" --write-calibration "$OUT/calibration.json" 2>&1 | tee "$OUT/simulate_check.txt"
  ;;
e2e)
  if [ "$SMOKE" = 1 ]; then
    M=(); FIRST=20; THEN=40
  else
    M=(--set model.n_layer=8 --set model.d_model=2048 --set model.n_head=16 --set model.block_size=1024
       --set model.moe.num_experts=64 --set model.moe.top_k=8 --set model.moe.ffn_hidden_size=1024
       --set train.batch_size=8); FIRST=40; THEN=80
  fi
  M+=(--set train.eval_every=10 --set train.eval_batches=1 --set train.save_every=0 --set train.save_every_minutes=0
      --ep-size "$NGPU")
  train() {  # train NAME SECONDS ARGS...: one c2r-train run under the deepspeed launcher, into $OUT/NAME
    local name=$1 limit=$2; shift 2
    timeout "$(bounded "$limit")" python -m deepspeed.launcher.runner --num_gpus "$NGPU" \
      --master_port $((29600 + RANDOM % 300)) --module c2r.train "${M[@]}" "$@" --out "$OUT/$name" \
      > "$OUT/$name.log" 2>&1
    echo "== $name rc $?"
  }
  train before 170 --steps "$FIRST" --dispatch per-expert --profile --overwrite
  timeout "$(bounded 90)" python -m c2r.place_cli plan --traces "$OUT/before/profile/traces" --ranks "$NGPU" \
    --holdout 0.3 --calibrate "$OUT/before" --out "$OUT/plan.json" > "$OUT/plan.txt" 2>&1
  echo "== plan rc $?"; grep -i -A12 "predicted step" "$OUT/plan.txt" | head -16
  rm -rf "$OUT/after" "$OUT/control"
  timeout "$(bounded 60)" python -m c2r.place_cli apply --plan "$OUT/plan.json" \
    --checkpoint "$OUT/before/checkpoints" --out "$OUT/after/checkpoints" > "$OUT/apply.txt" 2>&1
  echo "== apply rc $?"; tail -3 "$OUT/apply.txt"
  mkdir -p "$OUT/control" && cp -r "$OUT/before/checkpoints" "$OUT/control/checkpoints"
  train after 150 --steps "$THEN" --resume --plan "$OUT/plan.json" --dispatch per-rank --profile
  train control 150 --steps "$THEN" --resume --dispatch per-expert --profile
  # like with like: the same steps (the first 10 after the resume left out: its warm-up), the same profiler
  python benchmarks/train_report.py "$OUT/before" --gpus "$NGPU" --from-step 10
  python benchmarks/train_report.py "$OUT/control" "$OUT/after" --gpus "$NGPU" --from-step $((FIRST + 10))
  python -m profiling.cli dashboard "$OUT/before" -o "$OUT/before.html" > /dev/null 2>&1; echo "== dashboard rc $?"
  python -m profiling.cli dashboard "$OUT/control" "$OUT/after" -o "$OUT/compare.html" 2>&1 | tail -3
  ;;
esac
echo "== $PART done in $(($(date +%s) - S)) s; outputs in $OUT"
