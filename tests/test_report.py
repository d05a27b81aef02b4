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
  with open(os.path.join(root, "adapter.rank=2,optim.lr=0.0001", "metrics.jsonl"), "a") as f:
    f.write("{not json\n")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "report.py"), root],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      f"error: {root}/adapter.rank=2,optim.lr=0.0001/metrics.jsonl: line 5: not JSON "
      "(Expecting property name enclosed in double quotes)"]
