#!/usr/bin/env bash
# The expert-parallel measurements that need 2 GPUs of one host (docs/benchmarks.md, docs/gpu_runs.md; issues 11, 12
# and 15 read their 2-GPU lines from these tables). Each part fits in 10 minutes on 2 x H200 (its time caps add up
# to at most 570 s); run them one at a time:
#   bash benchmarks/two_gpu_runs.sh ep-fine          ep_bench, DeepSeek-like and Qwen3-like rows, main contenders;
#                                                    then DeepSpeed's MoE alone, last (it can hang)
#   bash benchmarks/two_gpu_runs.sh ep-mixtral-node  Mixtral-like row; replicated placements (E + 2R slots, and 2E
#                                                    with the balanced copy choice); per-node dispatch with two
#                                                    one-GPU nodes (--gpus-per-node 1)
#   bash benchmarks/two_gpu_runs.sh e2e 8            c2r-train of the fine-grained model (3.36 B parameters, 0.54 B
#                                                    active a token), 8k tokens per GPU: per-expert contiguous, then
#                                                    profile -> plan -> per-rank + plan against per-rank contiguous
#                                                    (the control: the plan's own gain)
#   bash benchmarks/two_gpu_runs.sh e2e 32           the same at 32k tokens per GPU
#   bash benchmarks/two_gpu_runs.sh e2e-overlap      8k tokens: per-rank + plan with DeepSpeed's overlap_comm on,
#                                                    beside the same run with it off
#   bash benchmarks/two_gpu_runs.sh e2e-kernels      32k tokens: a kernel profile of the per-rank + plan step
#   bash benchmarks/two_gpu_runs.sh ep-profile       where per-expert, per-rank and MegaBlocks' EP layer spend their
#                                                    time on the DeepSeek-like row (torch.profiler, 3 steps each)
# NGPU=1 runs the same on one GPU (an EP group of one: no replicas, nothing on the wire), e.g. to try the script.
# Needs megablocks and grouped_gemm importable (README.md, 'GPU install'; or a prepared `.device/setup.sh`, sourced
# when present). Outputs under $OUT (default runs/two_gpu/<part>), a few files a part (a GPU call brings back 8);
# the c2r-train runs' directories (profiles, traces) go to $RUNS (default a new directory under /tmp, deleted at the
# end), their logs to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS="ep-fine, ep-mixtral-node, e2e 8, e2e 32, e2e-overlap, e2e-kernels, ep-profile"
PART=${1:?usage: two_gpu_runs.sh PART ($PARTS)}
case $PART in ep-fine | ep-mixtral-node | e2e | e2e-overlap | e2e-kernels | ep-profile) ;; *) echo "two_gpu_runs.sh: unknown part '$PART' ($PARTS)" >&2; exit 2 ;; esac
NGPU=${NGPU:-2}
[ -f .device/setup.sh ] && { source .device/setup.sh >/dev/null || exit 1; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# the plans (ep_bench's planned layouts, c2r-place plan) need Mt-KaHyPar: say so before any GPU minute
python -c "import mtkahypar" 2>/dev/null || { echo "two_gpu_runs.sh: mtkahypar is not importable (pip install mtkahypar; for an offline GPU host run \`make device-wheels\` before the call)" >&2; exit 2; }
OUT=${OUT:-runs/two_gpu/$PART${2:-}}; mkdir -p "$OUT"
S=$(date +%s)
left() { echo $((570 - $(date +%s) + S)); }  # seconds left of a 10-minute call
# a timeout of at most $1 seconds that ends by the call's end (timeout 0 would mean none: never below 1)
bounded() { local l; l=$(left); l=$((l < $1 ? l : $1)); echo $((l < 1 ? 1 : l)); }
# --plan-method named: a planner that fails stops ep_bench in one line instead of measuring another plan
EP_BENCH=(python -m torch.distributed.run --nproc_per_node "$NGPU" benchmarks/ep_bench.py --rounds 3 --iters 10
  --plan-method kahypar)
show() {  # show FILE: ep_bench's own lines and its table; where a timeout cut it short, the rows that completed
  grep "^ep_bench" "$1"
  if grep -q "^| config" "$1"; then grep "^|" "$1"; else echo "(no final table: the rows that completed)"; grep "^row |" "$1"; fi
}
# the run directories of c2r-train (profiles and traces: many files) stay off $OUT, which brings back 8
if [ -z "${RUNS:-}" ]; then RUNS=$(mktemp -d /tmp/two_gpu_runs.XXXXXX); trap 'rm -rf "$RUNS"' EXIT; fi

case $PART in
ep-fine)
  timeout 240 python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tail -3
  timeout "$(bounded 220)" "${EP_BENCH[@]}" --configs deepseek-like qwen3-like --json "$OUT/ep_fine.json" --contenders \
    c2r-per-expert-contiguous c2r-per-rank-contiguous c2r-per-rank-planned c2r-per-rank-planned-overlap2 \
    c2r-per-expert-contiguous-overlap2 megablocks-dmoe-ep raw-all-to-all single-device > "$OUT/ep_fine.txt" 2>&1
  echo "== ep_bench rc $?"; show "$OUT/ep_fine.txt"
  # DeepSpeed's MoE alone and last, under its own cap: it hangs on 4 gloo CPU ranks, and a hang must cost only its row
  timeout "$(bounded 100)" "${EP_BENCH[@]}" --configs deepseek-like qwen3-like --routing router \
    --json "$OUT/ep_deepspeed.json" --contenders deepspeed-moe-ep > "$OUT/ep_deepspeed.txt" 2>&1
  echo "== deepspeed-moe-ep rc $?"; show "$OUT/ep_deepspeed.txt"
  ;;
ep-mixtral-node)
  timeout 250 "${EP_BENCH[@]}" --configs mixtral-like --json "$OUT/ep_mixtral.json" --contenders c2r-per-expert-contiguous \
    c2r-per-rank-contiguous c2r-per-rank-planned megablocks-dmoe-ep raw-all-to-all > "$OUT/ep_mixtral.txt" 2>&1
  echo "== mixtral-like rc $?"; show "$OUT/ep_mixtral.txt"
  timeout "$(bounded 600)" "${EP_BENCH[@]}" --configs deepseek-like --gpus-per-node 1 --routing synthetic \
    --json "$OUT/ep_rep_node.json" --contenders c2r-per-rank-planned c2r-per-rank-replicated c2r-per-expert-replicated \
    c2r-per-rank-balanced c2r-per-expert-balanced c2r-per-node-contiguous c2r-per-node-planned c2r-per-node-replicated \
    megablocks-dmoe-ep > "$OUT/ep_rep_node.txt" 2>&1
  echo "== replicated + per-node rc $?"; show "$OUT/ep_rep_node.txt"
  ;;
e2e | e2e-overlap | e2e-kernels)
  case $PART in
  e2e) B=${2:?usage: two_gpu_runs.sh e2e 8|32 (thousand tokens per GPU)}; T=$((B == 8 ? 110 : 135)) ;;
  e2e-overlap) B=8; T=200 ;;
  e2e-kernels) B=32; T=180 ;;
  esac
  # the fine-grained model of docs/gpu_runs.md: 8 MoE layers, d_model 2048, 64 SwiGLU experts top-8, ffn 1024
  # (3.36 B parameters, 3.22 B of them in experts; 0.54 B active a token); no checkpoint is saved
  M="--set model.n_layer=8 --set model.d_model=2048 --set model.n_head=16 --set model.block_size=1024
     --set model.moe.num_experts=64 --set model.moe.top_k=8 --set model.moe.ffn_hidden_size=1024
     --set train.eval_every=10 --set train.eval_batches=1 --set train.save_last=false --set train.save_every=0
     --set train.save_every_minutes=0 --steps 20 --set train.batch_size=$B --ep-size $NGPU"
  train() {  # train NAME SECONDS ARGS...: one c2r-train run into $RUNS/NAME, its log in $OUT/NAME.log
    local name=$1 limit=$2 rc t0=$(date +%s); shift 2
    timeout "$(bounded "$limit")" python -m deepspeed.launcher.runner --num_gpus "$NGPU" --module c2r.train $M "$@" \
      --overwrite --out "$RUNS/$name" > "$OUT/$name.log" 2>&1
    rc=$?; echo "== $name rc $rc in $(($(date +%s) - t0)) s"
    [ "$rc" = 0 ] || tail -n 15 "$OUT/$name.log"
  }
  report() { python benchmarks/train_report.py "$@" --gpus "$NGPU" --from-step 10 --evaluations; }
  # a short profiled run gives the plan its routing traces (8k tokens per GPU: the traces, not the speed, matter)
  plan() {
    train profiled 100 --steps 8 --set train.batch_size=8 --dispatch per-expert --profile
    timeout "$(bounded 50)" python -m c2r.place_cli plan --traces "$RUNS/profiled/profile/traces" --ranks "$NGPU" \
      --out "$OUT/plan.json" > "$OUT/plan.txt" 2>&1
    echo "== plan rc $?"; tail -5 "$OUT/plan.txt"
  }
  case $PART in
  e2e)  # caps: T + 100 + 50 + 2 T <= 570
    train per-expert "$T" --dispatch per-expert
    plan
    train per-rank-plan "$T" --dispatch per-rank --plan "$OUT/plan.json"
    # the control: per-rank dispatch over the contiguous layout, so that per-rank-plan against it is the plan alone
    train per-rank "$T" --dispatch per-rank
    report "$RUNS/per-expert" "$RUNS/per-rank" "$RUNS/per-rank-plan"
    ;;
  e2e-overlap)  # DeepSpeed's overlap_comm is off in our GPU config (one H200: its device syncs cost 4%); on 2 GPUs?
    plan
    python -c "import json; c = json.load(open('deepspeed_configs/gpu_bf16_zero2.json'));
c['zero_optimization']['overlap_comm'] = True; json.dump(c, open('$RUNS/ds_overlap.json', 'w'))"
    train per-rank-plan "$T" --dispatch per-rank --plan "$OUT/plan.json"
    train per-rank-plan-overlap "$T" --dispatch per-rank --plan "$OUT/plan.json" --deepspeed-config "$RUNS/ds_overlap.json"
    report "$RUNS/per-rank-plan" "$RUNS/per-rank-plan-overlap"
    ;;
  e2e-kernels)
    plan
    train per-rank-plan-kernels "$T" --steps 8 --dispatch per-rank --plan "$OUT/plan.json" --profile-kernels 3 \
      --set profile.kernel_warmup=4
    K="$RUNS/per-rank-plan-kernels/profile/kernels.txt"
    [ -f "$K" ] && cp "$K" "$OUT/kernels.txt" && sed -n 1,12p "$K" && grep -a -A8 "GPU idle, by the phase\|host syncs per step" "$K"
    ;;
  esac
  ;;
ep-profile)
  timeout "$(bounded 400)" "${EP_BENCH[@]}" --configs deepseek-like --routing synthetic --rounds 1 --iters 5 --profile 3 \
    --contenders c2r-per-expert-contiguous c2r-per-rank-contiguous c2r-per-rank-planned megablocks-dmoe-ep \
    > "$OUT/ep_profile.txt" 2> "$OUT/ep_profile.err"
  echo "== ep-profile rc $?"; show "$OUT/ep_profile.txt"; grep -a -A12 "^--- profile" "$OUT/ep_profile.err" | cut -c1-170
  ;;
esac
echo "== $PART done in $(($(date +%s) - S)) s; outputs in $OUT"
