#!/usr/bin/env bash
# The paper's headline runs on one accelerator, as one command within a time budget (default 540 s):
#   1. the paper classifier, all 10,000 steps of batch 256 on DATA (5,000 held out), evaluated;
#   2. the paper generator for as many of its 50,000 steps as the time left allows (a later call resumes it);
#   3. 10,000 samples from it with the paper's sampler (DDPM, 1,000 steps);
#   4. their FID against DATA's training images where the FID weights are given, else the samples are kept
#      for computing FID afterwards on a CPU (`cifarjax fid samples-*.npz ...` after joining them).
# Run from the checkout with cifarjax importable (PYTHONPATH=. works):
#   experiments/accelerator_run.sh DATA OUT [BUDGET_SECONDS]
# Workdirs (checkpoints) live in $WORK (default runs/accelerator) so a later call continues them; OUT receives
# at most 8 files of at most 16 MiB: the classifier's summary and graph, the generator's metrics, the samples
# in two halves, fid.json.
# Smaller settings for a CPU smoke check come from the environment: CLASSIFIER_STEPS, UNET, NUM_SAMPLES,
# SAMPLER, SAMPLE_STEPS, STEPS_PER_CALL, SAMPLING_RESERVE_S, GENERATOR_SECONDS, FID_WEIGHTS (see
# tests/test_accelerator_run.py).
set -euo pipefail
data=$1; out=$2; budget=${3:-540}
work=${WORK:-runs/accelerator}
k=${STEPS_PER_CALL:-50}
num=${NUM_SAMPLES:-10000}
reserve=${SAMPLING_RESERVE_S:-150}  # seconds kept for sampling and FID after the generator trains
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
cj() { python -m cifarjax "$@"; }
mkdir -p "$out" "$work"

cj info
cj train-classifier --data "$data" --workdir "$work/classifier" --steps "${CLASSIFIER_STEPS:-10000}" \
  --steps-per-call "$k" --log-every "$k" --eval-every $((10 * k)) --checkpoint-every $((20 * k))
cp "$work/classifier/summary.json" "$out/classifier-summary.json"
cp "$work/classifier/training_graph.png" "$out/classifier-training-graph.png"

# Ctrl-C (SIGINT) makes a training run save a checkpoint and stop: timeout sends it when the budget is spent.
# GENERATOR_SECONDS, where set, replaces the budget's share (a fixed time, for the CPU smoke check).
train_s=${GENERATOR_SECONDS:-$(($(left) - reserve))}
if [ "$train_s" -gt 30 ]; then
  timeout -s INT "$train_s" python -m cifarjax train-diffusion --data "$data" --workdir "$work/generator" \
    --unet "${UNET:-paper}" --steps-per-call "$k" --log-every "$k" --eval-every $((20 * k)) \
    --checkpoint-every $((20 * k)) || { rc=$?; [ $rc -eq 130 ] || [ $rc -eq 124 ]; }
fi
if [ ! -d "$work/generator/checkpoints" ]; then
  echo "no time was left to train the generator (budget $budget s); outputs in $out"; exit 0
fi
cp "$work/generator/metrics.jsonl" "$out/generator-metrics.jsonl"  # a stopped run writes no summary

sampler=(--sampler "${SAMPLER:-ddpm}")
[ -n "${SAMPLE_STEPS:-}" ] && sampler+=(--steps "$SAMPLE_STEPS")
cj sample --workdir "$work/generator" --num "$num" "${sampler[@]}" --out "$work/samples.npz"
python - "$work/samples.npz" "$out" <<'PY'
import sys, numpy as np
samples = np.load(sys.argv[1]); half = (len(samples["images"]) + 1) // 2
for i, part in enumerate((slice(0, half), slice(half, None))):  # two files of at most 15.4 MB
  np.savez_compressed(f"{sys.argv[2]}/samples-{i + 1}-of-2.npz", images=samples["images"][part],
                      labels=samples["labels"][part])
PY
if [ -n "${FID_WEIGHTS:-}" ]; then
  cj fid "$work/samples.npz" "$data" --weights "$FID_WEIGHTS" --json > "$out/fid.json"
fi
echo "done in $(($(date +%s) - start)) s; outputs in $out:"; ls -l "$out"
