"""experiments/report.py over hand-written workdirs: CSV values, markdown, PNGs from the data."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ftjax import report
from ftjax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_runs(root, seed, dpo=False):
  """Four workdirs (rank x lr) with random logged metrics; returns {run: logged lines}."""
  rng = np.random.default_rng(seed)
  logged = {}
  for rank in (2, 8):
    for lr in (1e-4, 3e-4):
      name = f"adapter.rank={rank},optim.lr={lr}"
      d = os.path.join(root, name)
      os.makedirs(os.path.join(d, "checkpoints", "4"))
      json.dump({"adapter": {"rank": rank, "kind": "lora"}, "optim": {"lr": lr},
                 "train": {"steps": 4}}, open(os.path.join(d, "config.json"), "w"))
      lines = []
      for step in (2, 4):
        line = {"step": step, "time": 1.0 + step, "loss": float(rng.uniform(1, 3))}
        if dpo:
          line.update({"rewards/chosen": float(rng.normal()), "kl/chosen": float(rng.uniform()),
                       "rewards/margins": float(rng.normal())})
        lines.append(line)
        lines.append({"step": step, "time": 1.5 + step, "eval_loss": float(rng.uniform(1, 3))})
      with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
      logged[name] = lines
  return logged


def test_csv_markdown_and_plots_follow_the_runs(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  logged = _make_runs(a, 0)
  _make_runs(b, 1)
  out = report.write_report(a, x="adapter.rank", y="eval_loss")
  assert out["swept"] == ["adapter.rank", "optim.lr"]  # the keys whose values differ
  rows = list(csv.DictReader(open(out["csv"])))
  assert len(rows) == 4
  for row in rows:
    lines = logged[row["run"]]
    evals = [x["eval_loss"] for x in lines if "eval_loss" in x]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert float(row["final/eval_loss"]) == evals[-1]
    assert float(row["best/eval_loss"]) == min(evals)
    assert float(row["final/loss"]) == losses[-1] and float(row["best/loss"]) == min(losses)
    assert row["step"] == "4" and row["run"].startswith(f"adapter.rank={row['adapter.rank']},")
  md = open(out["md"]).read()
  assert md.startswith("| run | adapter.rank | optim.lr | step |")
  assert f"{min(x['eval_loss'] for x in logged[rows[0]['run']] if 'eval_loss' in x):.4g}" in md
  assert "frontier" not in out  # no DPO metrics

  out_b = report.write_report(b, x="adapter.rank", y="eval_loss")
  again = report.write_report(a, x="adapter.rank", y="eval_loss", out=str(tmp_path / "a2"))
  for key in ("metric", "curves"):
    png = open(out[key], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert png == open(again[key], "rb").read()  # the same runs draw the same bytes
    assert png != open(out_b[key], "rb").read()  # other values, another picture


def test_dpo_frontier_and_measurements(tmp_path):
  root = str(tmp_path / "dpo")
  _make_runs(root, 2, dpo=True)
  out = report.write_report(root)
  assert report.frontier_axes(out["rows"]) == ("final/kl/chosen", ["final/rewards/chosen",
                                                                   "final/rewards/margins"])
  assert os.path.getsize(out["frontier"]) > 5000
  # With a measured KL (the β study's sampled one) the frontier uses it and the true reward;
  # the reference model's measurements are a row of their own.
  for name in os.listdir(root):
    if name.startswith("adapter."):
      json.dump({"true_reward": 0.5, "kl": 3.0}, open(os.path.join(root, name, "eval.json"), "w"))
  os.makedirs(os.path.join(root, "reference"))
  json.dump({"true_reward": 0.25, "true_reward_sem": 0.05, "kl": 0.0},
            open(os.path.join(root, "reference", "eval.json"), "w"))
  out = report.write_report(root)
  rows = {r["run"]: r for r in csv.DictReader(open(out["csv"]))}
  assert float(rows["reference"]["measured/true_reward"]) == 0.25
  assert rows["reference"]["adapter.rank"] == ""  # not a training run: no config
  assert "| reference |  |  |  |" in open(out["md"]).read()
  rows = out["rows"]
  assert report.frontier_axes(rows)[0] == "measured/kl"
  assert report.frontier_axes(rows)[1][0] == "measured/true_reward"


def test_bad_inputs_are_one_line(tmp_path):
  root = str(tmp_path / "r")
  _make_runs(root, 0)
  with pytest.raises(UserError, match="--y=eval_lss: no run logged it"):
    report.write_report(root, y="eval_lss")
  with pytest.raises(UserError, match="--x=model.dtype: not a swept key"):
    report.write_report(root, x="model.dtype")
  # A torn last line (a killed run, a full disk) is skipped, as training's resume skips it.
  run = os.path.join(root, "adapter.rank=2,optim.lr=0.0001")
  with open(os.path.join(run, "metrics.jsonl"), "a") as f:
    f.write('{"step": 6, "loss": 0.0')
  report_py = [sys.executable, os.path.join(ROOT, "experiments", "report.py")]
  out = subprocess.run([*report_py, root], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "metrics.jsonl: line 5 is torn" in out.stderr
  rows = {r["run"]: r for r in csv.DictReader(open(os.path.join(root, "report.csv")))}
  assert len(rows) == 4 and rows["adapter.rank=2,optim.lr=0.0001"]["step"] == "4"
  assert float(rows["adapter.rank=2,optim.lr=0.0001"]["best/loss"]) > 0.0  # not the torn 0.0
  # In the middle of the file it is damage, not a kill: one line naming the file and line.
  with open(os.path.join(run, "metrics.jsonl"), "a") as f:
    f.write("\n" + json.dumps({"step": 8, "loss": 1.0}) + "\n")
  out = subprocess.run([*report_py, root], capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      f"error: {run}/metrics.jsonl: line 5: not JSON (Expecting ',' delimiter)"]


def test_runs_that_differ_only_in_seed_are_grouped_with_intervals(tmp_path):
  import scipy.stats
  root = str(tmp_path / "seeds")
  rng = np.random.default_rng(3)
  final, counts = {}, {}
  for rank in (4, 8):
    for seed in (0, 1, 2):
      d = os.path.join(root, f"adapter.rank={rank},train.seed={seed}")
      os.makedirs(d)
      json.dump({"adapter": {"rank": rank}, "train": {"seed": seed, "steps": 2}},
                open(os.path.join(d, "config.json"), "w"))
      losses = rng.uniform(1, 3, 2)
      with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": s + 1, "loss": float(v)}) + "\n"
                     for s, v in enumerate(losses))
      k, n = int(rng.integers(0, 5)), 40
      json.dump({"invented": k / n, "invented_k": k, "invented_n": n, "eval_loss": 1.5 + seed},
                open(os.path.join(d, "eval.json"), "w"))
      final.setdefault(rank, []).append(float(losses[-1]))
      counts.setdefault(rank, []).append(k)
  # A run without a seed (the base's measurements) is a group of its own.
  os.makedirs(os.path.join(root, "base"))
  json.dump({"eval_loss": 4.0}, open(os.path.join(root, "base", "eval.json"), "w"))
  out = report.write_report(root)
  assert out["swept"] == ["adapter.rank", "train.seed"] and out["group_keys"] == ["adapter.rank"]
  groups = {g["group"]: g for g in out["groups"]}
  assert set(groups) == {"rank=4", "rank=8", "base"} and groups["base"]["n"] == 1
  for rank in (4, 8):
    g, vals = groups[f"rank={rank}"], final[rank]
    assert g["n"] == 3 and g["runs"] == [f"adapter.rank={rank},train.seed={s}" for s in range(3)]
    lo, hi = scipy.stats.t.interval(0.95, 2, loc=np.mean(vals), scale=scipy.stats.sem(vals))
    np.testing.assert_allclose([g["final/loss"], g["final/loss/lo"], g["final/loss/hi"]],
                               [np.mean(vals), lo, hi], rtol=1e-9)
    assert g["final/loss/std"] == pytest.approx(np.std(vals, ddof=1), rel=1e-9)
    # The invented rate pools the counts of the three runs: a Wilson interval over 120 replies.
    ci = scipy.stats.binomtest(sum(counts[rank]), 120).proportion_ci(method="wilson")
    assert (g["measured/invented/k"], g["measured/invented/trials"]) == (sum(counts[rank]), 120)
    np.testing.assert_allclose([g["measured/invented"], g["measured/invented/lo"],
                                g["measured/invented/hi"]],
                               [sum(counts[rank]) / 120, ci.low, ci.high], rtol=1e-9, atol=1e-15)
  assert groups["base"]["measured/eval_loss"] == 4.0 and groups["base"]["measured/eval_loss/lo"] \
      is None
  # The table shows mean ± half-width; report_groups.csv has the numbers; the plot has the means.
  md = open(out["md"]).read()
  g = groups["rank=4"]
  assert (f"| rank=4 | 4 | 3 | {g['final/loss']:.4g} ± "
          f"{(g['final/loss/hi'] - g['final/loss/lo']) / 2:.4g} |") in md
  assert "| base |  | 1 |" in md and "measured/invented_k" not in md.split("\n\n")[-1]
  rows = {r["group"]: r for r in csv.DictReader(open(out["groups_csv"]))}
  assert float(rows["rank=8"]["final/loss/hi"]) == groups["rank=8"]["final/loss/hi"]
  assert out["metric"].endswith("loss_vs_adapter.rank.png")
  assert open(out["metric"], "rb").read()[:4] == b"\x89PNG"
