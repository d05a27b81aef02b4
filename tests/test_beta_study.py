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


def test_dpo_beta_repro_smoke(base_dir, tmp_path):
  """repro.py's dpo_beta (ftjax/recipes/repro_rl.py) at smoke scale, from a given SFT model
  (the tiny test model: the study's own SFT stage is the demo's, test_demo's): DPO at one
  beta, measurements, the README's verdict; a rerun trains and measures nothing."""
  from ftjax.recipes import repro_rl
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  r = repro_rl.dpo_beta(work, out, smoke=True, sft_hf=base_dir)
  runs = r["runs"]
  assert [x["beta"] for x in runs] == [None, 1.0]
  assert abs(runs[0]["kl"]) < 1e-4  # the reference against itself (sampler = forward)
  for x in runs:
    assert 0.0 <= x["true_reward"] <= 1.0 and np.isfinite(x["kl"])
  cfg = json.load(open(tmp_path / "work" / "dpo_beta" / "seed0" / "beta=1.0" / "config.json"))
  assert cfg["dpo"]["beta"] == 1.0 and cfg["model"]["hf_path"] == r["sft"]  # from the SFT
  readme = open(os.path.join(out, "README.md")).read()
  assert f"**Verdict at this scale: {r['verdict']['word']}.**" in readme
  assert "python experiments/repro.py --name=dpo_beta --smoke" in readme
  assert os.path.getsize(os.path.join(out, "frontier.png")) > 1000
  # Rerunning trains and measures nothing again.
  evals = sorted((tmp_path / "work" / "dpo_beta").rglob("eval.json"))
  mtimes = [os.path.getmtime(p) for p in evals]
  repro_rl.dpo_beta(work, out, smoke=True, sft_hf=base_dir)
  assert mtimes == [os.path.getmtime(p) for p in evals]


def test_repro_rl_statistics_match_scipy():
  """The verdicts' numbers: Spearman's rho (with ties) and the seeds' 95% t intervals, as
  scipy.stats computes them; and each verdict's rule on made-up runs."""
  import scipy.stats
  from ftjax.recipes import repro_rl
  rng = np.random.default_rng(0)
  for x, y in [(rng.normal(size=12), rng.normal(size=12)),
               ([0.03, 0.1, 0.3, 1.0] * 3, rng.integers(0, 4, 12))]:  # ties on both sides
    np.testing.assert_allclose(repro_rl.spearman(x, y), scipy.stats.spearmanr(x, y)[0],
                               rtol=1e-12)
  kl = {0.03: [9.0, 11.0, 10.5], 0.1: [6.0, 7.5, 6.2], 1.0: [1.0, 2.5, 1.4]}
  runs = [{"seed": s, "beta": b, "kl": v[s], "true_reward": 0.5} for b, v in
          [(None, [0.0] * 3), *kl.items()] for s in range(3)]
  v = repro_rl.dpo_verdict(runs, list(kl))
  d = np.subtract(kl[0.03], kl[1.0])
  lo, hi = scipy.stats.t.interval(0.95, 2, loc=d.mean(), scale=scipy.stats.sem(d))
  np.testing.assert_allclose([v["diff"]["lo"], v["diff"]["hi"]], [lo, hi], rtol=1e-9)
  assert v["word"] == "holds" and v["spearman"] < 0
  flipped = [{**x, "kl": -x["kl"]} for x in runs]
  assert repro_rl.dpo_verdict(flipped, list(kl))["word"] == "does not hold"

  def curve(p1, pg):
    return {0: {"pass_at_1": p1[0], "pass_at_G": pg[0]},
            10: {"pass_at_1": p1[1], "pass_at_G": pg[1]}}
  runs = [{"curve": curve((0.30, 0.90), (0.85, 0.86))}, {"curve": curve((0.33, 0.93), (0.86,
          0.88))}, {"curve": curve((0.31, 0.88), (0.84, 0.85))}]
  v = repro_rl.grpo_verdict(runs)
  assert [p["word"] for p in v["parts"]] == ["holds", "holds"] and v["word"] == "holds"
  dg = [0.01, 0.02, 0.01]
  lo, hi = scipy.stats.t.interval(0.95, 2, loc=np.mean(dg), scale=scipy.stats.sem(dg))
  np.testing.assert_allclose([v["parts"][1]["interval"]["lo"], v["parts"][1]["interval"]["hi"]],
                             [lo, hi], rtol=1e-6)
  risen = [{"curve": curve((0.3, 0.9), (0.80, 0.97 + i / 100))} for i in range(3)]
  assert [p["word"] for p in repro_rl.grpo_verdict(risen)["parts"]] == ["holds", "does not hold"]
