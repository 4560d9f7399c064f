#!/usr/bin/env bash
# The paper's headline runs and the generator's `improved` preset on one accelerator, as one command
# within a time budget (default 540 s), resumable across calls:
#   0. with RESUME=DIR, unpacks DIR/state.tar.part-* (what an earlier call put in its OUT) into $WORK;
#      with FID_WEIGHTS, computes the training images' reference statistics first, inside the budget;
#   1. the paper classifier, all 10,000 steps of batch 256 on DATA (5,000 held out), evaluated (a resumed
#      call finds it done);
#   2. the paper and the improved generator (experiments/generator_improved.py): the paper one trains for
#      its share of the time left, compiling included, then stops as on Ctrl-C with a checkpoint, and the
#      improved one trains to the same step;
#   3. packs the workdirs (the latest checkpoint of each, metrics, graphs, configs) into OUT/state.tar.part-*
#      (parts of at most 15 MiB) before any FID, so that a call stopped during the FIDs still resumes;
#   4. with FID_WEIGHTS, the FIDs of both against DATA's training images (DPM-Solver++ 20 steps first, each
#      FID only where the measured speed says it ends inside the budget). Without them no samples are
#      drawn: the carried-back state is scored afterwards (`cifarjax eval-diffusion --workdir ...`).
# Run from the checkout with cifarjax importable (PYTHONPATH=. works):
#   [RESUME=DIR] [FID_WEIGHTS=FILE] experiments/accelerator_run.sh DATA OUT [BUDGET_SECONDS]
# OUT receives at most 7 files of at most 15 MiB: report.md (the tables), classifier-summary.json,
# generator-fids.jsonl (with FID_WEIGHTS) and up to 4 state parts.
# Smaller settings for a CPU smoke check come from the environment: CLASSIFIER_STEPS, UNET, NUM_SAMPLES,
# STEPS_PER_CALL, FID_RESERVE_S, GENERATOR_SECONDS (see tests/test_accelerator_run.py).
set -euo pipefail
data=$1; out=$2; budget=${3:-540}
work=${WORK:-runs/accelerator}
k=${STEPS_PER_CALL:-50}
num=${NUM_SAMPLES:-10000}
reserve=${FID_RESERVE_S:-150}  # seconds kept for packing the state and the FIDs after training
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
cj() { python3 -m cifarjax "$@"; }
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out" "$work"

if [ -n "${RESUME:-}" ]; then
  parts=("$RESUME"/state.tar.part-*)
  [ -e "${parts[0]}" ] || { echo "RESUME=$RESUME holds no state.tar.part-*" >&2; exit 2; }
  cat "${parts[@]}" | tar -x -C "$work"
  echo "resumed from ${#parts[@]} state parts in $RESUME"
fi
cj info
if [ -n "${FID_WEIGHTS:-}" ]; then  # cached in the cache folder; a later call on this machine reads it
  python3 - "$data" "$FID_WEIGHTS" <<'PY'
import sys
from cifarjax import fid
from cifarjax.config import DIFFUSION_PRESETS
fid.training_reference_stats(sys.argv[1], DIFFUSION_PRESETS["paper"].holdout, sys.argv[2])
PY
fi

cj train-classifier --data "$data" --workdir "$work/classifier" --steps "${CLASSIFIER_STEPS:-10000}" \
  --steps-per-call "$k" --log-every "$k" --eval-every $((10 * k)) --checkpoint-every $((20 * k))
cp "$work/classifier/summary.json" "$out/classifier-summary.json"

# The paper generator trains for (time left - reserve) / 2, the improved one then about as long again;
# GENERATOR_SECONDS, where set, replaces that share (a fixed time, for the CPU smoke check).
if [ -n "${GENERATOR_SECONDS:-}" ]; then
  train_s=$GENERATOR_SECONDS
else
  train_s=$((($(left) - reserve) / 2))
fi
gen=(--data "$data" --out "$work/generators" --only paper improved --steps-per-call "$k")
[ -n "${UNET:-}" ] && gen+=(--unet "$UNET")
if [ "$train_s" -ge 30 ] || [ -n "${GENERATOR_SECONDS:-}" ]; then
  python3 "$here/generator_improved.py" "${gen[@]}" --train-seconds "$train_s" | tee "$out/report.md"
else
  echo "no time was left to train the generators (budget $budget s)" | tee "$out/report.md"
fi

# The state that resumes: each workdir with its latest complete checkpoint only.
python3 - "$work" "$out" <<'PY'
import io, pathlib, sys, tarfile
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
PART = 15 * 2**20
older = set()  # every checkpoint but the latest complete one of its folder (and partial writes)
for folder in work.rglob("checkpoints"):
  steps = sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
  older |= set(folder.iterdir()) - set(steps[-1:])
buffer = io.BytesIO()
with tarfile.open(fileobj=buffer, mode="w") as tar:
  for path in sorted(work.rglob("*")):
    if path.is_file() and not older & set(path.parents):
      tar.add(path, arcname=str(path.relative_to(work)))
blob = buffer.getvalue()
for old in out.glob("state.tar.part-*"):
  old.unlink()
for i in range(0, len(blob), PART):
  (out / f"state.tar.part-{i // PART:02d}").write_bytes(blob[i:i + PART])
print(f"state: {len(blob) / 2**20:.1f} MiB in {-(-len(blob) // PART)} parts of at most 15 MiB")
PY

if [ -n "${FID_WEIGHTS:-}" ] && [ -d "$work/generators/paper/checkpoints" ]; then
  python3 "$here/generator_improved.py" "${gen[@]}" --fid-weights "$FID_WEIGHTS" --num "$num" \
    --steps "$(ls "$work/generators/paper/checkpoints" | grep -E '^[0-9]+$' | sort -n | tail -1)" \
    --budget-s $(($(left) - 10)) | tee "$out/report.md"
  [ ! -f "$work/generators/fid.jsonl" ] || cp "$work/generators/fid.jsonl" "$out/generator-fids.jsonl"
fi
echo "done in $(($(date +%s) - start)) s; outputs in $out:"; ls -l "$out"
