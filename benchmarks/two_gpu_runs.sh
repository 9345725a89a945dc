#!/usr/bin/env bash
# The expert-parallel measurements that need 2 GPUs of one host (docs/benchmarks.md, docs/gpu_runs.md; issues 11, 12
# and 15 read their 2-GPU lines from these tables). Each part fits in 10 minutes on 2 x H200; run them one at a time:
#   bash benchmarks/two_gpu_runs.sh ep-fine          ep_bench, DeepSeek-like and Qwen3-like rows, main contenders
#   bash benchmarks/two_gpu_runs.sh ep-mixtral-node  Mixtral-like row; replicated placements (E + 2R slots, and 2E
#                                                    with the balanced copy choice); per-node dispatch with two
#                                                    one-GPU nodes (--gpus-per-node 1)
#   bash benchmarks/two_gpu_runs.sh e2e 8            c2r-train of the ~1B fine-grained model, 8k tokens per GPU:
#                                                    per-expert contiguous vs profile -> plan -> per-rank + plan
#   bash benchmarks/two_gpu_runs.sh e2e 32           the same at 32k tokens per GPU, and a kernel profile of the
#                                                    per-rank + plan step
#   bash benchmarks/two_gpu_runs.sh ep-profile       where per-expert, per-rank and MegaBlocks' EP layer spend their
#                                                    time on the DeepSeek-like row (torch.profiler, 3 steps each)
# NGPU=1 runs the same on one GPU (an EP group of one: no replicas, nothing on the wire), e.g. to try the script.
# Needs megablocks and grouped_gemm importable (README.md, 'GPU install'; or a prepared `.device/setup.sh`, sourced
# when present). Outputs under $OUT (default runs/two_gpu/<part>).
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: two_gpu_runs.sh ep-fine|ep-mixtral-node|e2e 8|e2e 32|ep-profile}
case $PART in ep-fine | ep-mixtral-node | e2e | ep-profile) ;; *) echo "two_gpu_runs.sh: unknown part '$PART' (ep-fine, ep-mixtral-node, e2e 8, e2e 32, ep-profile)" >&2; exit 2 ;; esac
NGPU=${NGPU:-2}
[ -f .device/setup.sh ] && { source .device/setup.sh >/dev/null || exit 1; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# the plans (ep_bench's planned and capped layouts, c2r-place plan) need Mt-KaHyPar: say so before any GPU minute
python -c "import mtkahypar" 2>/dev/null || { echo "two_gpu_runs.sh: mtkahypar is not importable (pip install mtkahypar; for an offline GPU host run \`make device-wheels\` before the call)" >&2; exit 2; }
OUT=${OUT:-runs/two_gpu/$PART${2:-}}; mkdir -p "$OUT"
S=$(date +%s)
left() { echo $((570 - $(date +%s) + S)); }  # seconds left of a 10-minute call
# a timeout of at most $1 seconds that ends by the call's end (timeout 0 would mean none: never below 1)
bounded() { local l; l=$(left); l=$((l < $1 ? l : $1)); echo $((l < 1 ? 1 : l)); }
EP_BENCH=(python -m torch.distributed.run --nproc_per_node "$NGPU" benchmarks/ep_bench.py --rounds 3 --iters 10)

case $PART in
ep-fine)
  timeout 240 python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tail -3
  timeout "$(bounded 600)" "${EP_BENCH[@]}" --configs deepseek-like qwen3-like --json "$OUT/ep_fine.json" --contenders \
    c2r-per-expert-contiguous c2r-per-rank-contiguous c2r-per-rank-planned c2r-per-rank-planned-overlap2 \
    c2r-per-expert-contiguous-overlap2 megablocks-dmoe-ep deepspeed-moe-ep raw-all-to-all single-device \
    > "$OUT/ep_fine.txt" 2>&1
  echo "== ep_bench rc $?"; grep "^|" "$OUT/ep_fine.txt"
  ;;
ep-mixtral-node)
  timeout 250 "${EP_BENCH[@]}" --configs mixtral-like --json "$OUT/ep_mixtral.json" --contenders c2r-per-expert-contiguous \
    c2r-per-rank-contiguous c2r-per-rank-planned megablocks-dmoe-ep raw-all-to-all > "$OUT/ep_mixtral.txt" 2>&1
  echo "== mixtral-like rc $?"; grep "^|" "$OUT/ep_mixtral.txt"
  timeout "$(bounded 600)" "${EP_BENCH[@]}" --configs deepseek-like --gpus-per-node 1 --json "$OUT/ep_rep_node.json" --contenders \
    c2r-per-rank-planned c2r-per-rank-replicated c2r-per-expert-replicated c2r-per-rank-balanced \
    c2r-per-expert-balanced c2r-per-node-contiguous c2r-per-node-planned c2r-per-node-replicated megablocks-dmoe-ep \
    > "$OUT/ep_rep_node.txt" 2>&1
  echo "== replicated + per-node rc $?"; grep "^|" "$OUT/ep_rep_node.txt"
  ;;
e2e)
  B=${2:?usage: two_gpu_runs.sh e2e 8|32 (thousand tokens per GPU)}
  T=$((B == 8 ? 110 : 150))  # per run
  M="--set model.n_layer=8 --set model.d_model=2048 --set model.n_head=16 --set model.block_size=1024
     --set model.moe.num_experts=64 --set model.moe.top_k=8 --set model.moe.ffn_hidden_size=1024
     --set train.eval_every=10 --set train.eval_batches=1 --set train.save_last=false --set train.save_every=0
     --set train.save_every_minutes=0 --steps 20 --set train.batch_size=$B --ep-size $NGPU"
  train() { local name=$1; shift; timeout "$(bounded "$T")" python -m deepspeed.launcher.runner --num_gpus "$NGPU" \
    --module c2r.train $M "$@" --overwrite --out "$OUT/$name" > "$OUT/$name.log" 2>&1; echo "== $name rc $?"; }
  report() { python benchmarks/train_report.py "$OUT/$1" --gpus "$NGPU" --from-step 10 --evaluations; }
  train per-expert --dispatch per-expert; report per-expert
  # a short profiled run gives the plan its routing traces (8k tokens per GPU: the traces, not the speed, matter)
  train profiled --steps 8 --set train.batch_size=8 --dispatch per-expert --profile
  timeout "$(bounded 60)" python -m c2r.place_cli plan --traces "$OUT/profiled/profile/traces" --ranks "$NGPU" --out "$OUT/plan.json" \
    > "$OUT/plan.txt" 2>&1
  echo "== plan rc $?"; tail -5 "$OUT/plan.txt"
  train per-rank-plan --dispatch per-rank --plan "$OUT/plan.json"; report per-rank-plan
  if [ "$B" = 8 ]; then
    train per-rank --dispatch per-rank; report per-rank
    # DeepSpeed's overlap_comm is off in our GPU config (one H200: its device syncs cost 4%); does it pay on 2 GPUs?
    python -c "import json; c = json.load(open('deepspeed_configs/gpu_bf16_zero2.json'));
c['zero_optimization']['overlap_comm'] = True; json.dump(c, open('$OUT/ds_overlap.json', 'w'))"
    train per-rank-plan-overlap --dispatch per-rank --plan "$OUT/plan.json" --deepspeed-config "$OUT/ds_overlap.json"
    report per-rank-plan-overlap
  else
    train per-rank-plan-kernels --steps 8 --dispatch per-rank --plan "$OUT/plan.json" --profile-kernels 3 \
      --set profile.kernel_warmup=4
    sed -n 1,12p "$OUT/per-rank-plan-kernels/profile/kernels.txt"
    grep -a -A8 "GPU idle, by the phase\|host syncs per step" "$OUT/per-rank-plan-kernels/profile/kernels.txt"
  fi
  ;;
ep-profile)
  timeout "$(bounded 400)" "${EP_BENCH[@]}" --configs deepseek-like --routing synthetic --rounds 1 --iters 5 --profile 3 \
    --contenders c2r-per-expert-contiguous c2r-per-rank-contiguous c2r-per-rank-planned megablocks-dmoe-ep \
    > "$OUT/ep_profile.txt" 2> "$OUT/ep_profile.err"
  echo "== ep-profile rc $?"; grep "^|" "$OUT/ep_profile.txt"; grep -a -A12 "^--- profile" "$OUT/ep_profile.err" | cut -c1-170
  ;;
esac
echo "== $PART done in $(($(date +%s) - S)) s; outputs in $OUT"
