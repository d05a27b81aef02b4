"""The β study runs end to end (tiny settings) as a sweep and a report."""

import csv
import json
import os

import numpy as np

from ftjax.recipes import beta_study


def test_beta_study_smoke(base_dir, tmp_path):
  # One β (not the config's default 0.1, so the config check below can fail): each DPO run is
  # a training subprocess, and the sweep of several values is test_sweep's.
  rows = beta_study.run(str(tmp_path / "study"), ["1.0"], sft_dir=base_dir, steps=2,
                        n_prompts=4, smoke=True)
  assert [r["beta"] for r in rows] == [None, 1.0]
  assert abs(rows[0]["kl"]) < 1e-4  # the reference against itself (sampler = forward)
  for r in rows:
    assert 0.0 <= r["true_reward"] <= 1.0 and np.isfinite(r["kl"])
  root = tmp_path / "study" / "dpo"
  for beta in ("1.0",):  # one sweep run each, with its β, measured beside its metrics
    run = root / f"dpo.beta={beta}"
    assert json.load(open(run / "config.json"))["dpo"]["beta"] == float(beta)
    assert json.load(open(run / "sweep_status.json"))["status"] == "done"
    assert "true_reward" in json.load(open(run / "eval.json"))
  table = {r["run"]: r for r in csv.DictReader(open(root / "report.csv"))}
  assert sorted(table) == ["dpo.beta=1.0", "reference"]
  for name, r in zip(["reference", "dpo.beta=1.0"], rows):
    assert float(table[name]["measured/true_reward"]) == r["true_reward"]
    assert float(table[name]["measured/kl"]) == r["kl"]
  assert "measured/true_reward" in open(root / "report.md").read()
  assert os.path.getsize(root / "frontier.png") > 1000
