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



def test_aif_stage_smoke(base_dir, tmp_path):
  """--rl=aif: the SFT model labels its own replies to training tickets against the shipped
  constitution, then DPO trains on those pairs; the report names the stage and carries the
  counts of every rate (and of the held-out pairs and the judge's agreement with the rule)."""
  import json
  r = demo.run_rl("aif", str(tmp_path), base_dir, smoke=True, eval_examples=4)
  lb = r["labels"]
  pairs = [json.loads(x) for x in open(lb["path"])]
  prov = json.load(open(lb["path"] + ".provenance.json"))
  assert lb["path"] == str(tmp_path / "aif_labels" / "pairs.jsonl")
  assert prov["pairs"] == len(pairs) > 0 and prov["judge"] == f"llm:{base_dir}"
  assert prov["rubric"] == demo.CONSTITUTION and prov["judge_scale"] == "10"
  assert prov["rubric_sha256"] and prov["seed"] == 0
  for p in pairs:  # the judge's own scores order every pair
    assert p["chosen_score"] > p["rejected_score"]
  # DPO ran on those pairs: its workdir's config names them, and it took its steps.
  cfg = json.load(open(tmp_path / "aif" / "config.json"))
  assert cfg["data"]["path"] == lb["path"]
  names = {k for k, _, _ in demo.METRICS}
  rates = names - {"eval_loss"}
  assert set(r["metrics"]) == names | {f"{k}_{c}" for k in rates for c in "kn"}
  assert r["pair_accuracy"]["n"] > 0 and 0 <= r["pair_accuracy"]["k"] <= r["pair_accuracy"]["n"]
  assert 0 <= lb["rule_agree_k"] <= lb["rule_agree_n"] <= len(pairs)
  assert np.isfinite(r["kl_to_sft"]) and r["samples"]
  report = {"before": r["metrics"], "after": r["metrics"], "after_rl": r["metrics"], "rl": "aif",
            "kl_to_sft": r["kl_to_sft"], "kl_unit": r["kl_unit"], "samples": [], "merged": "m",
            "adapter": "a", "total_s": 1.0, "labels": lb, "pair_accuracy": r["pair_accuracy"]}
  text = demo.format_report(report)
  assert "after AIF" in text and "support_constitution.txt" in text
  assert f"held-out preference pairs ranked right {r['pair_accuracy']['k']}/" in text
