"""The demo's --rl stage (ftjax/recipes/demo.py): GRPO (the task scorer as reward) and PPO (a
reward model trained on the shipped pairs) from an SFT model, with the held-out metrics and the
KL to the SFT model."""

import numpy as np
import pytest

from ftjax.recipes import demo


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_rl_stage_smoke(base_dir, tmp_path, kind):
  r = demo.run_rl(kind, str(tmp_path), base_dir, smoke=True, eval_examples=4)
  names = {k for k, _, _ in demo.METRICS}  # each rate with its counts (Wilson intervals)
  rates = names - {"eval_loss"}
  assert set(r["metrics"]) == names | {f"{k}_{c}" for k in rates for c in "kn"}
  assert np.isfinite(r["kl_to_sft"])
  if kind == "grpo":  # k3 to the reference (the SFT model) is >= 0; PPO logs k1's mean
    assert r["kl_to_sft"] >= 0
  assert (tmp_path / kind).is_dir() and r["samples"]
  if kind == "ppo":
    assert (tmp_path / "reward_model").is_dir()
  report = {"before": r["metrics"], "after": r["metrics"], "after_rl": r["metrics"], "rl": kind,
            "kl_to_sft": r["kl_to_sft"], "kl_unit": r["kl_unit"], "samples": [], "merged": "m",
            "adapter": "a", "total_s": 1.0}
  text = demo.format_report(report)
  assert f"after {kind.upper()}" in text
  # GRPO's kl is a per-token mean, PPO's objective/kl a sum over the reply: the label says which.
  assert ("per token" if kind == "grpo" else "per reply") in text

