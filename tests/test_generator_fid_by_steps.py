"""experiments/generator_fid_by_steps.py: the runs trained milestone by milestone, the FIDs of
each at each (the fuller set at --full-at, the linear schedule at --linear-at), kept across
calls, and a milestone a run has passed reported rather than measured at the wrong step.
Training and sampling are real (tiny U-Nets, --quick); the Inception statistics are a
fingerprint of the samples (tests/test_generator_improved.py), so each value tells which
images it came from."""

import pytest

from test_generator_improved import experiment_with_fingerprints


@pytest.fixture
def script(monkeypatch):
  return experiment_with_fingerprints(monkeypatch, "generator_fid_by_steps")


@pytest.mark.integration
def test_fids_at_each_milestone_after_training_only_kept_and_not_remeasured(script, tmp_path, monkeypatch, capsys):
  weights = tmp_path / "weights.npz"  # stands in for the Inception weights: only its sha256 counts
  weights.write_bytes(b"weights")
  # Trained to the first milestone without FIDs, then measured there and trained on.
  assert script.run(tmp_path, [2], None, linear_at=2, quick=True) is None
  assert not (tmp_path / "fid.jsonl").exists()
  # Each run's main FID is measured as soon as it reaches a milestone, before the next run trains.
  measured_before = {}
  train_for = script.gi.train_for

  def train_noting_what_was_measured(config, workdir):
    measured_before[workdir.name, config.steps] = {
        (r["run"], r["train_step"], r["weights"], r["sampler"]) for r in script.gi.read_records(
            tmp_path / "fid.jsonl")} if (tmp_path / "fid.jsonl").exists() else set()
    return train_for(config, workdir)

  monkeypatch.setattr(script.gi, "train_for", train_noting_what_was_measured)
  table = script.run(tmp_path, [4, 2], None, fid_weights=weights, linear_at=2, num=4, quick=True)
  assert ("paper", 4, "ema", "dpm++2m") in measured_before["improved", 4]
  assert ("paper", 4, "ema", "ddim") not in measured_before["improved", 4]  # the full set after
  assert ("paper", 2, "ema", "dpm++2m") in measured_before["improved", 2]
  records = script.gi.read_records(tmp_path / "fid.jsonl")
  cells = {(r["train_step"], *script.gi.fid_key(r)) for r in records}
  main = script.MAIN
  want = {(2, "paper", *main), (2, "improved", *main), (2, "linear-schedule", *main),
          (4, "paper", *main), (4, "improved", *main)}
  want |= {(4, run, *cell) for run in ("paper", "improved") for cell in script.FULL}
  want |= {(4, "improved", "ema", g, "dpm++2m", 20) for g in script.GUIDANCE}  # label dropout
  assert cells == want and len(records) == len(want)
  assert all(r["num"] == 4 for r in records)
  # The milestones' checkpoints stay for later FIDs; the linear run stops at its milestone.
  for run, steps in (("paper", ["2", "4"]), ("improved", ["2", "4"]), ("linear-schedule", ["2"])):
    assert sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir()) == steps

  value = {(r["train_step"], *script.gi.fid_key(r)): r["fid"] for r in records}
  rows = {tuple(c.strip() for c in line.split("|")[1:5]): [c.strip() for c in line.split("|")[5:7]]
          for line in table.splitlines()[2:]}
  assert table.splitlines()[0].split("|")[5:7] == [" step 2 ", " step 4 "]
  assert rows["paper", "ema", "0", "dpm++2m 20"] == [f"{value[2, 'paper', *main]:.2f}",
                                                      f"{value[4, 'paper', *main]:.2f}"]
  assert rows["linear-schedule", "ema", "0", "dpm++2m 20"] == [
      f"{value[2, 'linear-schedule', *main]:.2f}", ""]
  assert (tmp_path / "fid_by_steps.png").stat().st_size > 0

  # Called again, and with a milestone both runs have passed, it samples nothing: the FIDs it
  # has are kept, and those it lacks at a passed step are reported, not measured at step 4.
  def no_sampling(*args, **kwargs):
    raise AssertionError("sampled again")
  from cifarjax import generate
  monkeypatch.setattr(generate, "generate", no_sampling)
  capsys.readouterr()
  again = script.run(tmp_path, [2, 3, 4], None, fid_weights=weights, linear_at=2, num=4, quick=True)
  assert "paper is past step 3; its FIDs there are what fid.jsonl kept" in capsys.readouterr().out
  assert script.gi.read_records(tmp_path / "fid.jsonl") == records
  paper = next(l for l in again.splitlines() if l.startswith("| paper ") and "dpm++2m 20" in l
               and "| ema " in l)
  assert [c.strip() for c in paper.split("|")[5:8]] == [
      f"{value[2, 'paper', *main]:.2f}", "", f"{value[4, 'paper', *main]:.2f}"]
