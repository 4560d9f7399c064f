#!/usr/bin/env bash
# The paper's headline runs and the generator's `improved` preset on one accelerator, as one command
# within a time budget (default 540 s):
#   1. the paper classifier, all 10,000 steps of batch 256 on DATA (5,000 held out), evaluated;
#   2. the paper and the improved generator (experiments/generator_improved.py): the paper one trains for
#      its share of the time left, then stops as on Ctrl-C with a checkpoint (a later call resumes both),
#      and the improved one trains to the same step;
#   3. where FID weights are given, the FIDs of both against DATA's training images with DDPM, DDIM and
#      DPM-Solver++ (most telling first, while the budget lasts); else 10,000 samples of the paper
#      generator with its own sampler (DDPM, 1,000 steps), kept for a FID computed afterwards on a CPU
#      (`cifarjax fid samples-*.npz ...` after joining them).
# Run from the checkout with cifarjax importable (PYTHONPATH=. works):
#   experiments/accelerator_run.sh DATA OUT [BUDGET_SECONDS]
# Workdirs (checkpoints) live in $WORK (default runs/accelerator) so a later call continues them; OUT receives
# at most 8 files of at most 16 MiB: the classifier's summary and graph, the generators' metrics and FID table,
# and the FIDs (generator-fids.jsonl) or the samples in two halves.
# Smaller settings for a CPU smoke check come from the environment: CLASSIFIER_STEPS, UNET, NUM_SAMPLES,
# SAMPLER, SAMPLE_STEPS, STEPS_PER_CALL, FID_RESERVE_S, GENERATOR_SECONDS, FID_WEIGHTS (see
# tests/test_accelerator_run.py).
set -euo pipefail
data=$1; out=$2; budget=${3:-540}
work=${WORK:-runs/accelerator}
k=${STEPS_PER_CALL:-50}
num=${NUM_SAMPLES:-10000}
reserve=${FID_RESERVE_S:-150}  # seconds kept for sampling and FID after the generators train
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
cj() { python3 -m cifarjax "$@"; }
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out" "$work"

cj info
cj train-classifier --data "$data" --workdir "$work/classifier" --steps "${CLASSIFIER_STEPS:-10000}" \
  --steps-per-call "$k" --log-every "$k" --eval-every $((10 * k)) --checkpoint-every $((20 * k))
cp "$work/classifier/summary.json" "$out/classifier-summary.json"
cp "$work/classifier/training_graph.png" "$out/classifier-training-graph.png"

# The paper generator trains for (time left - reserve) / 2, the improved one then about as long again;
# GENERATOR_SECONDS, where set, replaces that share (a fixed time, for the CPU smoke check).
if [ -n "${GENERATOR_SECONDS:-}" ]; then
  train_s=$GENERATOR_SECONDS
else
  train_s=$((($(left) - reserve) / 2))
  if [ "$train_s" -lt 30 ]; then
    echo "no time was left to train the generators (budget $budget s); outputs in $out"; exit 0
  fi
fi
gen=(--data "$data" --out "$work/generators" --only paper improved --steps-per-call "$k" --num "$num")
[ -n "${UNET:-}" ] && gen+=(--unet "$UNET")
[ -n "${FID_WEIGHTS:-}" ] && gen+=(--fid-weights "$FID_WEIGHTS")
python3 "$here/generator_improved.py" "${gen[@]}" --train-seconds "$train_s" \
  --budget-s $(($(left) - 10)) | tee "$out/generators.md"
for run in paper improved; do
  cp "$work/generators/$run/metrics.jsonl" "$out/generator-$run-metrics.jsonl"
done

if [ -n "${FID_WEIGHTS:-}" ]; then  # every FID measured so far, each with its training step
  [ ! -f "$work/generators/fid.jsonl" ] || cp "$work/generators/fid.jsonl" "$out/generator-fids.jsonl"
else  # samples of the paper generator with its own sampler, for a FID computed afterwards
  sampler=(--sampler "${SAMPLER:-ddpm}")
  [ -n "${SAMPLE_STEPS:-}" ] && sampler+=(--steps "$SAMPLE_STEPS")
  cj sample --workdir "$work/generators/paper" --num "$num" "${sampler[@]}" --out "$work/samples.npz"
  python3 - "$work/samples.npz" "$out" <<'PY'
import sys, numpy as np
samples = np.load(sys.argv[1]); half = (len(samples["images"]) + 1) // 2
for i, part in enumerate((slice(0, half), slice(half, None))):  # two files of at most 15.4 MB
  np.savez_compressed(f"{sys.argv[2]}/samples-{i + 1}-of-2.npz", images=samples["images"][part],
                      labels=samples["labels"][part])
PY
fi
echo "done in $(($(date +%s) - start)) s; outputs in $out:"; ls -l "$out"
