"""experiments/sweep.py: a grid of runs, one workdir each, skipped when done, checked first."""

import csv
import json
import os
import subprocess
import sys

import pytest

from ftjax import report, sweep
from ftjax.errors import UserError
from tests.conftest import BASE_SEQ

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "sft.py") + ":adapter=lora,smoke"


def _fixed(base_dir, chat_files, **extra):
  train, ev = chat_files
  kw = {"model.hf_path": base_dir, "data.path": train, "data.eval_path": ev, "train.steps": 2,
        "train.seq_len": BASE_SEQ, **extra}
  return [f"--config.{k}={v}" for k, v in kw.items()]


def _cli(args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "sweep.py"),
                         f"--config={CONFIG}", *args], capture_output=True, text=True,
                        timeout=300)


def test_expand_grid_zip_and_names():
  sweeps = [sweep.parse_sweep("adapter.rank=1,2,4"), sweep.parse_sweep("optim.lr=1e-4;3e-4;1e-3")]
  assert len(sweep.expand(sweeps, "grid")) == 9
  assert sweep.expand(sweeps, "zip") == [{"adapter.rank": "1", "optim.lr": "1e-4"},
                                         {"adapter.rank": "2", "optim.lr": "3e-4"},
                                         {"adapter.rank": "4", "optim.lr": "1e-3"}]
  with pytest.raises(UserError, match="equal length"):
    sweep.expand([sweeps[0], sweep.parse_sweep("optim.lr=1e-4,3e-4")], "zip")
  with pytest.raises(UserError, match="swept twice"):
    sweep.expand([sweeps[0], sweeps[0]])
  # --seeds=N: each setting once per train.seed in 0..N-1, crossed with a zip as with a grid.
  assert sweep.expand(sweeps, "grid", seeds=2)[:3] == [
      {"adapter.rank": "1", "optim.lr": "1e-4", "train.seed": "0"},
      {"adapter.rank": "1", "optim.lr": "1e-4", "train.seed": "1"},
      {"adapter.rank": "1", "optim.lr": "3e-4", "train.seed": "0"}]
  assert len(sweep.expand(sweeps, "grid", seeds=3)) == 27
  assert len(sweep.expand(sweeps, "zip", seeds=3)) == 9
  assert sweep.expand([], seeds=3) == [{"train.seed": s} for s in ("0", "1", "2")]
  assert sweep.expand([], seeds=3) == sweep.expand([sweep.parse_sweep("train.seed=0,1,2")])
  with pytest.raises(UserError, match="--seeds=-1: give the number of seeds"):
    sweep.expand([], seeds=-1)
  with pytest.raises(UserError, match="both set train.seed"):
    sweep.expand([sweep.parse_sweep("train.seed=1,2")], seeds=2)
  with pytest.raises(UserError, match=r"train.seed is both swept \(--seeds\) and fixed"):
    sweep.plan(CONFIG, "/nonexistent", [], ["--config.train.seed=3"], seeds=2)
  assert sweep.run_name({"adapter.rank": "4", "data.path": "/a/b.jsonl"}) == \
      "adapter.rank=4,data.path=_a_b.jsonl"
  dpo = sweep.load_config([f"--config={os.path.join(ROOT, 'configs', 'dpo.py')}:smoke"])
  assert sweep.infer_script(dpo).endswith(os.path.join("experiments", "dpo.py"))
  rm = sweep.load_config([f"--config={os.path.join(ROOT, 'configs', 'reward.py')}:smoke"])
  assert sweep.infer_script(rm).endswith(os.path.join("experiments", "reward.py"))
  grpo = sweep.load_config([f"--config={os.path.join(ROOT, 'configs', 'grpo.py')}:smoke"])
  assert sweep.infer_script(grpo).endswith(os.path.join("experiments", "grpo.py"))


def test_typo_and_dry_run_write_nothing(base_dir, chat_files, tmp_path):
  root = tmp_path / "sweep"
  args = [f"--workdir={root}", "--sweep=adapter.rank=2,4", "--sweep=optim.lr=1e-4,3e-4",
          *_fixed(base_dir, chat_files)]
  out = _cli(args + ["--dry_run"])
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 4
  for line, (r, lr) in zip(lines, [(2, "1e-4"), (2, "3e-4"), (4, "1e-4"), (4, "3e-4")]):
    name = f"adapter.rank={r},optim.lr={lr}"
    assert f"--workdir={root}/{name} " in line and "experiments/sft.py" in line
    assert line.endswith(f"--config.adapter.rank={r} --config.optim.lr={lr}")
  # --seeds=3 with one --sweep: the grid × seeds, one workdir per seed, nothing written.
  seeds = _cli([args[0], "--sweep=adapter.rank=2,4", "--seeds=3", *args[3:], "--dry_run"])
  assert seeds.returncode == 0, seeds.stderr
  lines = seeds.stdout.strip().splitlines()
  assert len(lines) == 6
  for line, (r, s) in zip(lines, [(r, s) for r in (2, 4) for s in range(3)]):
    assert f"--workdir={root}/adapter.rank={r},train.seed={s} " in line
    assert line.endswith(f"--config.adapter.rank={r} --config.train.seed={s}")
  typo = _cli(args[:1] + ["--sweep=adapter.rnak=2,4", *args[2:]])
  err = typo.stderr.strip().splitlines()
  assert typo.returncode == 1 and len(err) == 1 and "rnak" in err[0], typo.stderr
  bad_value = _cli(args + ["--sweep=train.batch_size=4,x"])
  err = bad_value.stderr.strip().splitlines()
  assert bad_value.returncode == 1 and len(err) == 1 and "batch_size" in err[0], bad_value.stderr
  assert not root.exists()


def test_failed_runs_do_not_stop_the_sweep(base_dir, chat_files, tmp_path):
  """batch_size 4 is not divisible by grad_accum 3 or 5: both runs fail, both are tried."""
  root = tmp_path / "sweep"
  out = _cli([f"--workdir={root}", "--sweep=train.grad_accum=3,5",
              *_fixed(base_dir, chat_files, **{"train.batch_size": 4})])
  last = out.stderr.strip().splitlines()[-1]
  assert out.returncode == 1
  assert last.startswith("error: 2 of 2 runs failed: train.grad_accum=3 (error: ")
  assert "train.grad_accum=5" in last and "not divisible" in last
  for n in (3, 5):
    status = json.load(open(root / f"train.grad_accum={n}" / sweep.STATUS_FILE))
    assert status["status"] == "failed" and status["returncode"] == 1


def test_sweep_runs_then_skips_and_resumes(base_dir, chat_files, tmp_path):
  # Two keys zipped: two runs (each a training subprocess) that differ in both; the grid's
  # names and commands are checked without training (test_typo_and_dry_run_write_nothing).
  # train.keep and optim.lr leave the compiled train step the same: one compile for both runs.
  root = str(tmp_path / "sweep")
  sweeps = [sweep.parse_sweep("train.keep=2,3"), sweep.parse_sweep("optim.lr=1e-4,3e-4")]
  # The rest is conftest's sft_lora_run config (tests/test_sft.py make_config) but for the
  # steps: the subprocesses load its compiled step (the schedule's numbers are an input of it).
  same_step = {"train.batch_size": 4, "train.grad_accum": 2, "adapter.dropout": 0.1}
  runs = sweep.plan(CONFIG, root, sweeps, _fixed(base_dir, chat_files, **same_step), mode="zip")
  sweep.write_definition(root, CONFIG, sweeps, [], "zip", runs)
  assert sweep.run_all(runs) == []
  assert sorted(os.listdir(root)) == ["sweep.json", "train.keep=2,optim.lr=1e-4",
                                      "train.keep=3,optim.lr=3e-4"]
  mtimes = {}
  for r in runs:
    cfg = json.load(open(os.path.join(r.workdir, "config.json")))
    assert cfg["train"]["keep"] == int(r.overrides["train.keep"])
    assert cfg["optim"]["lr"] == float(r.overrides["optim.lr"])
    assert cfg["train"]["steps"] == 2 and cfg["model"]["hf_path"] == base_dir
    m = os.path.join(r.workdir, "metrics.jsonl")
    assert max(json.loads(ln)["step"] for ln in open(m)) == 2
    mtimes[r.name] = (os.path.getmtime(m), open(m).read())

  said = []
  assert sweep.run_all(runs, said.append) == []
  assert all(s.endswith("done, skipped") for s in said)
  for r in runs:
    m = os.path.join(r.workdir, "metrics.jsonl")
    assert (os.path.getmtime(m), open(m).read()) == mtimes[r.name]

  # A run whose sweep was stopped before it was marked done runs again and resumes from its
  # checkpoint: no step is trained or logged twice.
  os.remove(os.path.join(runs[1].workdir, sweep.STATUS_FILE))
  said = []
  assert sweep.run_all(runs, said.append) == []
  assert [s.split(": ")[1] for s in said] == ["done, skipped", "running (log"]
  assert open(os.path.join(runs[1].workdir, "metrics.jsonl")).read() == mtimes[runs[1].name][1]
  assert open(os.path.join(runs[1].workdir, "log.txt")).read().count("\n# ") == 2

  # The report's CSV holds each run's logged values.
  out = report.write_report(root)
  assert out["swept"] == ["train.keep", "optim.lr"]
  rows = {r["run"]: r for r in csv.DictReader(open(out["csv"]))}
  for r in runs:
    logged = [json.loads(ln) for ln in open(os.path.join(r.workdir, "metrics.jsonl"))]
    last_eval = [x for x in logged if "eval_loss" in x][-1]["eval_loss"]
    assert float(rows[r.name]["final/eval_loss"]) == last_eval
    assert rows[r.name]["train.keep"] == r.overrides["train.keep"]
    assert rows[r.name]["status"] == "done"
