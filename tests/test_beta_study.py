"""The β study runs end to end (tiny settings) and writes its table and plot."""

import json
import os

import numpy as np

from experiments import beta_study


def test_beta_study_smoke(base_dir, tmp_path):
  rows = beta_study.run(str(tmp_path / "study"), ["0.1", "1.0"], sft_dir=base_dir, steps=2,
                        n_prompts=4, smoke=True)
  assert [r["beta"] for r in rows] == [None, 0.1, 1.0]
  assert abs(rows[0]["kl"]) < 1e-4  # the reference against itself (sampler = forward)
  for r in rows:
    assert 0.0 <= r["true_reward"] <= 1.0 and np.isfinite(r["kl"])
  saved = json.load(open(tmp_path / "study" / "beta_study.json"))
  assert len(saved) == 3
  assert "true reward" in open(tmp_path / "study" / "beta_study.md").read()
  assert os.path.getsize(tmp_path / "study" / "beta_study.png") > 1000
