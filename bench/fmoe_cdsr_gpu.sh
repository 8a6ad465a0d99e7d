#!/usr/bin/env bash
# The FMoE-CDSR replication set of issue 11 on one CUDA machine, every run at once.
#
#   bench/fmoe_cdsr_gpu.sh FKCB_DIR ML1M_DIR OUT_DIR [BUDGET_SECONDS]
#
# FKCB_DIR holds FedDCSR's <Domain>/{train,valid,test}_data.txt; ML1M_DIR is a folder named
# ml-1m with ml-1m.{inter,item,user}. A one-round probe of three methods (the mixture, FedSASRec
# and the branch's FedAvg: the three code paths) checks that CUDA works and times a round;
# the number of rounds is then the most that fits the budget (at least 20, at most 40), the
# same for every run. Runs, all with a 64-sequence batch and one local epoch a round:
#   fkcb          hidden 64: FMoE-CDSR, its two ablations, Local SASRec, FedSASRec, and Local
#                 and FedSASRec on FMoE-CDSR's branch (the backbone baselines)
#   fkcb_experts3 / fkcb_experts14
#                 hidden 64: FMoE-CDSR with the foreign experts as after 3 / 14 epochs (Table 5)
#   fkcb_h256     hidden 256 (the paper's): FMoE-CDSR, Local SASRec, FedSASRec
#   ml1m          hidden 64, 99 negatives: the same seven methods as fkcb
#   branch        FMoE-CDSR's specified branch against the tied head without the graph layer,
#                 with Local SASRec and FedSASRec, seeds 0-2, FKCB and ML-1M (bench_fmoe_cdsr_seeds.py)
# Results (bench/results-style .md and .json) and every run folder's metrics.jsonl and
# summary.json are packed into OUT_DIR/results.tar.gz and OUT_DIR/runs.tar.gz. Environment: PYTHON (python3),
# DEVICE (cuda), EXTRA (flags appended to every run, e.g. a tiny setting to try the script on a CPU; the branch
# group's bench_fmoe_cdsr_seeds.py takes only --embed-dim, --negatives and the harness flags of those),
# RUN_GROUPS (which of "fkcb experts h256 ml1m branch" to run; all but branch by default), FKCB_METHODS and H256_METHODS
# (the methods of those two groups, to rerun some), PROBE_METHODS (the probe's).
set -u
if [ $# -lt 3 ]; then
    echo "usage: $0 FKCB_DIR ML1M_DIR OUT_DIR [BUDGET_SECONDS]" >&2
    exit 2
fi
FKCB=$1 ML1M=$2 OUT=$3 BUDGET=${4:-480}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
started=$(date +%s)
mkdir -p "$OUT/results" "$OUT/logs"
PYTHON=${PYTHON:-python3}
BENCH="$PYTHON bench/bench_fmoe_cdsr.py --batch-size 64 --fmoe-encoder lean --device ${DEVICE:-cuda} --threads 1 --results $OUT/results"
SEVEN=fmoe-cdsr,fmoe-cdsr-uniform,fmoe-cdsr-unfrozen,local,fedsasrec,fmoe-cdsr-local,fmoe-cdsr-fedavg
RUN_GROUPS=${RUN_GROUPS:-fkcb experts h256 ml1m}
FKCB_METHODS=${FKCB_METHODS:-$SEVEN}
H256_METHODS=${H256_METHODS:-fmoe-cdsr,local,fedsasrec}
wanted() { case " $RUN_GROUPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

pack() {
    tar -czf "$OUT/results.tar.gz" -C "$OUT" results logs
    find runs -path 'runs/bench_probe*' -o -path 'runs/bench_fmoe_cdsr_*' | grep -E '/(metrics.jsonl|summary.json)$' | tar -czf "$OUT/runs.tar.gz" -T -
}
trap pack EXIT

# MPS lets the sixteen processes' small kernels share the GPU instead of taking turns; without
# it (not installed, or its daemon does not serve) the runs go on with plain time-slicing.
if [ "${DEVICE:-cuda}" = cuda ] && command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d && timeout 60 "$PYTHON" -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
        echo "MPS on"
        trap 'echo quit | nvidia-cuda-mps-control; pack' EXIT
    else
        echo quit | nvidia-cuda-mps-control
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        echo "MPS off"
    fi
fi

$BENCH --data fkcb --data-root "$FKCB" --embed-dim 64 --rounds 1 --only "${PROBE_METHODS:-fmoe-cdsr,fedsasrec,fmoe-cdsr-fedavg}" --jobs 3 --name probe \
    ${EXTRA:-} >"$OUT/logs/probe.log" 2>&1
cat "$OUT/logs/probe.log"
rounds=$("$PYTHON" - "$OUT/results/probe.json" "$started" "$BUDGET" <<'EOF'
import json, sys, time
rows = json.load(open(sys.argv[1]))
failed = [r["method"] for r in rows if "error" in r]
if failed:
    sys.exit(f"probe failed for {failed}")
per_round = next(r["wall_seconds"] for r in rows if r["method"] == "fmoe-cdsr")
left = float(sys.argv[3]) - (time.time() - float(sys.argv[2])) - 60  # 60 s to spare for the tables
# sixteen processes share the GPU and 16 cores: assume each round takes 2.5x the lone probe's
print(max(20, min(40, int(left / (2.5 * per_round)))))
EOF
) || exit 1
echo "probe: $rounds rounds for every run"
# Every run stops by the budget's end, so the tables and run folders are packed in any case
# (a run stopped early leaves its metrics.jsonl up to its last round, and no table row).
until_budget() {
    local left=$((started + BUDGET - 20 - $(date +%s)))
    timeout $((left > 1 ? left : 1)) "$@"
}

wanted fkcb && until_budget $BENCH --data fkcb --data-root "$FKCB" --embed-dim 64 --rounds "$rounds" --only "$FKCB_METHODS" --jobs 7 --name fmoe_cdsr_fkcb ${EXTRA:-} >"$OUT/logs/fkcb.log" 2>&1 &
wanted experts && for epochs in 3 14; do
    until_budget $BENCH --data fkcb --data-root "$FKCB" --embed-dim 64 --rounds "$rounds" --only fmoe-cdsr --fmoe-expert-epochs $epochs \
        --name fmoe_cdsr_fkcb_experts$epochs ${EXTRA:-} >"$OUT/logs/experts$epochs.log" 2>&1 &
done
# the paper-size and ML-1M runs yield the CPU to the main table's
wanted h256 && until_budget nice -n 5 $BENCH --data fkcb --data-root "$FKCB" --embed-dim 256 --rounds "$rounds" --only "$H256_METHODS" --jobs 3 --name fmoe_cdsr_fkcb_h256 \
    ${EXTRA:-} >"$OUT/logs/h256.log" 2>&1 &
wanted ml1m && until_budget nice -n 5 $BENCH --data ml-1m --data-root "$ML1M" --embed-dim 64 --negatives 99 --rounds "$rounds" --only "$SEVEN" --jobs 4 --name fmoe_cdsr_ml1m \
    ${EXTRA:-} >"$OUT/logs/ml1m.log" 2>&1 &
# The branch choice of issue 31 (opt-in: RUN_GROUPS=branch): FMoE-CDSR with the specified branch
# and with the tied head and no graph layer, next to Local SASRec and FedSASRec, seeds 0, 1 and 2,
# on both data sets (bench_fmoe_cdsr_seeds.py: a paired table over seeds per data set).
if wanted branch; then
    for data in fkcb ml-1m; do
        root=$FKCB; [ $data = ml-1m ] && root=$ML1M
        until_budget $PYTHON bench/bench_fmoe_cdsr_seeds.py --data $data --data-root "$root" --rounds "$rounds" --device ${DEVICE:-cuda} --jobs 6 \
            --results "$OUT/results" ${EXTRA:-} >"$OUT/logs/branch_$data.log" 2>&1 &
    done
fi
wait
tail -n 30 "$OUT"/logs/*.log
