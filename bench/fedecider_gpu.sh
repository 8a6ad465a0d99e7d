#!/usr/bin/env bash
# FeDecider at the size issue 31 asks for, on one CUDA machine: 200 users per genre domain,
# every method of bench/bench_fedecider.py, seeds 0, 1 and 2.
#
#   bench/fedecider_gpu.sh OUT_DIR [ROUNDS] [JOBS]
#
# ROUNDS (default 10) is the same for every run; each run's round is picked by its validation
# NDCG@5 and the table's "selected round" column gives it per seed, so a LoRA baseline still
# rising at the last round shows there. JOBS (default 4) runs share the GPU at once. A one-round probe of FeDecider checks
# that CUDA works and prints what a round costs before the 21 runs start. The tables (.md,
# .json, .png) go to OUT_DIR/results, every run folder's summary.json and metrics.jsonl to
# OUT_DIR/runs.tar.gz; commit OUT_DIR/results/fedecider_ml1m_200.* to bench/results/.
# Environment: PYTHON (python3), DEVICE (cuda), USERS (200), SEEDS (0,1,2).
set -u
if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR [ROUNDS] [JOBS]" >&2
    exit 2
fi
OUT=$1 ROUNDS=${2:-10} JOBS=${3:-4}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT/results"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
COMMON="--users ${USERS:-200} --device ${DEVICE:-cuda}"
started=$(date +%s)
pack() {
    find runs/bench_fedecider_ml1m_200 \( -name summary.json -o -name metrics.jsonl \) -print0 2>/dev/null | tar -czf "$OUT/runs.tar.gz" --null -T -
    echo "done in $(( $(date +%s) - started )) s"
}
trap pack EXIT
rm -rf runs/bench_fedecider_probe  # a finished probe would be read back, not timed
$PYTHON bench/bench_fedecider.py $COMMON --rounds 1 --seeds 0 --only fedecider --name fedecider_probe --results "$OUT/results" || exit 1
echo "probe: one round of FeDecider, $(( $(date +%s) - started )) s wall including the backbone's load"
# a failed run leaves the others in their folders; the report-only pass tables what finished
$PYTHON bench/bench_fedecider.py $COMMON --rounds "$ROUNDS" --seeds "${SEEDS:-0,1,2}" --jobs "$JOBS" --checkpoint-every 1 \
    --name fedecider_ml1m_200 --results "$OUT/results" ||
    $PYTHON bench/bench_fedecider.py $COMMON --rounds "$ROUNDS" --seeds "${SEEDS:-0,1,2}" --report-only --name fedecider_ml1m_200 --results "$OUT/results"
