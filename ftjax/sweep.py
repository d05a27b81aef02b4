"""Sweeps: a grid (or a zip) of config overrides, one workdir and one subprocess per run.

  python experiments/sweep.py --config=configs/sft.py:smoke --workdir=ROOT \
      --sweep=adapter.rank=1,2,4 --sweep=optim.lr=1e-4,3e-4 [--seeds=3] [--config.x=y ...] \
      [--dry_run]

Each run is the experiment script (inferred from the config: a `dpo`, `reward`, `grpo` or `ppo`
section picks that script, else sft.py; or `--script`) on `ROOT/<run>`, where `<run>` spells the
run's overrides (`adapter.rank=4,optim.lr=1e-4`); `--seeds=N` runs each of them with
train.seed = 0..N-1 (`adapter.rank=4,optim.lr=1e-4,train.seed=2`), the same as
`--sweep=train.seed=0,...,N-1`, for report.py's seed groups. Every run's flags are parsed here,
with the script's own parser, before any run starts: a typo in a swept key is one line and
nothing is written. Runs go one after the other, each in its own Python process (its own JAX
state), output appended to `ROOT/<run>/log.txt`. A run that exits 0 is marked done in
`ROOT/<run>/sweep_status.json` with its command; rerunning the sweep skips the runs done with
the same command and reruns the rest, which resume from their checkpoints. A failing run is
recorded and the sweep goes on; `run_all` returns the failed runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

from ftjax.errors import UserError

SWEEP_FILE = "sweep.json"  # ROOT/sweep.json: the sweep's definition, for report.py
STATUS_FILE = "sweep_status.json"  # ROOT/<run>/sweep_status.json: done or failed, and the command
LOG_FILE = "log.txt"
# A config section that names the algorithm, and so the script; no such section: sft.py.
SCRIPT_SECTIONS = ("dpo", "reward", "prm", "grpo", "ppo")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NAME = 120  # longer run names are cut and end in a hash of the whole name


@dataclasses.dataclass
class Run:
  name: str
  overrides: dict  # swept key -> value, as given on the command line
  workdir: str
  command: list  # argv of the run's process


def parse_sweep(spec: str) -> tuple[str, list[str]]:
  """`"adapter.rank=1,2,4"` -> ("adapter.rank", ["1", "2", "4"]). Values holding commas
  (`mesh.shape=data=2,fsdp=4`) are separated by `;` instead: a `;` anywhere switches to it."""
  key, sep, values = spec.partition("=")
  key = key.strip().removeprefix("--").removeprefix("config.")
  if not sep or not key or not values:
    raise UserError(f"--sweep={spec!r}: expected KEY=V1,V2,... (e.g. adapter.rank=4,8)")
  vals = [v.strip() for v in values.split(";" if ";" in values else ",")]
  if any(not v for v in vals):
    raise UserError(f"--sweep={spec!r}: an empty value")
  if len(set(vals)) != len(vals):
    raise UserError(f"--sweep={spec!r}: a value is repeated")
  return key, vals


SEED_KEY = "train.seed"  # what `--seeds=N` sweeps


def seed_values(seeds: int) -> list[str]:
  """`--seeds=N`: the values 0..N-1 of train.seed."""
  if int(seeds) < 1:
    raise UserError(f"--seeds={seeds}: give the number of seeds, 1 or more")
  return [str(s) for s in range(int(seeds))]


def expand(sweeps: list[tuple[str, list[str]]], mode: str = "grid", seeds: int = 0
           ) -> list[dict]:
  """Every combination (`grid`) or the i-th value of each sweep together (`zip`); with
  `seeds`, each of those once per train.seed in 0..seeds-1 (the seed is crossed with the
  other sweeps in either mode: seeds are repeats, not a setting to pair)."""
  keys = [k for k, _ in sweeps]
  dup = sorted({k for k in keys if keys.count(k) > 1})
  if dup:
    raise UserError(f"--sweep: {dup[0]} is swept twice")
  if seeds and SEED_KEY in keys:
    raise UserError(f"--seeds={seeds} and --sweep={SEED_KEY}=... both set {SEED_KEY}; give one")
  if seeds:
    values = seed_values(seeds)
    return [{**c, SEED_KEY: s} for c in expand(sweeps, mode) for s in values]
  if mode == "grid":
    combos = itertools.product(*[v for _, v in sweeps])
  elif mode == "zip":
    lengths = {k: len(v) for k, v in sweeps}
    if len(set(lengths.values())) > 1:
      raise UserError(f"--mode=zip needs sweeps of equal length, got {lengths}")
    combos = zip(*[v for _, v in sweeps])
  else:
    raise UserError(f"--mode={mode!r}: expected grid or zip")
  return [dict(zip(keys, c)) for c in combos]


def run_name(overrides: dict) -> str:
  """The run's directory name: its overrides, `key=value` joined by commas, with characters
  other than letters, digits and `.=,+-` replaced by `_` (a path value's slashes)."""
  name = ",".join(f"{k}={v}" for k, v in overrides.items()) or "base"
  name = re.sub(r"[^A-Za-z0-9.=,+\-]", "_", name)
  if len(name) > MAX_NAME:
    name = name[:MAX_NAME - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
  return name


def load_config(argv: list[str]):
  """The config the script would build from `argv` (`--config=...` and `--config.*`
  overrides), parsed with the scripts' own flag parser; a bad override is a UserError."""
  from absl import flags
  from ml_collections import config_flags

  from ftjax import cli
  if REPO not in sys.path:  # config files import `configs.sft`
    sys.path.insert(0, REPO)
  fv, argv = flags.FlagValues(), ["sweep", *argv]
  # sys_argv: config_flags declares one flag per `--config.*` override it finds there.
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  cli.check_flags(argv, fv)
  return fv.config


def infer_script(config, script: Optional[str] = None) -> str:
  """Path of the experiment script: `script` (a name or a path), else the one the config's
  algorithm section names (`dpo`, `reward`, `grpo`, `ppo`), else sft.py."""
  if not script:
    script = next((s for s in SCRIPT_SECTIONS if s in config), "sft")
  path = script if script.endswith(".py") else os.path.join(REPO, "experiments", script + ".py")
  if not os.path.isfile(path):
    raise UserError(f"--script: {path} not found")
  return path


def plan(config_arg: str, root: str, sweeps: list[tuple[str, list[str]]], fixed: list[str] = (),
         mode: str = "grid", script: Optional[str] = None,
         python: str = sys.executable, seeds: int = 0) -> list[Run]:
  """The sweep's runs, each checked by parsing its flags as its script would (nothing is
  written or run here).

  Args:
    config_arg: the `--config` value, `configs/sft.py:smoke`.
    root: the sweep's directory; run `r` goes to `root/r.name`.
    sweeps: (key, values) per `--sweep`.
    fixed: `--config.x=y` overrides given to every run.
    seeds: run each setting with train.seed = 0..seeds-1 (0: as the config says).
  """
  fixed_keys = {}
  for f in fixed:
    key, sep, _ = f.partition("=")
    if not key.startswith("--config.") or not sep:
      raise UserError(f"{f!r}: fixed overrides are written --config.KEY=VALUE")
    fixed_keys[key.removeprefix("--config.")] = f
  for key, _ in sweeps:
    if key in fixed_keys:
      raise UserError(f"config.{key} is both swept (--sweep) and fixed ({fixed_keys[key]})")
  if seeds and SEED_KEY in fixed_keys:
    raise UserError(f"config.{SEED_KEY} is both swept (--seeds) and fixed "
                    f"({fixed_keys[SEED_KEY]})")
  combos = expand(sweeps, mode, seeds)  # a bad spec is refused before the config is built
  base = load_config([f"--config={config_arg}", *fixed])
  path = infer_script(base, script)
  runs, names = [], {}
  for overrides in combos:
    argv = [f"--config={config_arg}", *fixed, *(f"--config.{k}={v}" for k, v in overrides.items())]
    try:
      load_config(argv)
    except UserError as e:
      where = ", ".join(f"{k}={v}" for k, v in overrides.items())
      raise UserError(f"--sweep ({where}): {e}") from None
    name = run_name(overrides)
    if name in names:
      raise UserError(f"runs {names[name]} and {overrides} get the same directory {name!r}")
    names[name] = overrides
    workdir = os.path.join(root, name)
    runs.append(Run(name, overrides, workdir, [python, path, *argv[:1], f"--workdir={workdir}",
                                               *argv[1:]]))
  return runs


def launch_line(run: Run) -> str:
  """One shell line for the run (what `--dry_run` prints for a cluster's job launcher)."""
  return " ".join(shlex.quote(a) for a in run.command)


def status(run: Run) -> Optional[dict]:
  path = os.path.join(run.workdir, STATUS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def is_done(run: Run) -> bool:
  """Finished with this same command (a changed command, e.g. more steps, runs again and
  resumes from the checkpoint)."""
  s = status(run)
  return bool(s) and s.get("status") == "done" and s.get("command") == run.command[1:]


def write_definition(root: str, config_arg: str, sweeps, fixed, mode: str, runs: list[Run],
                     seeds: int = 0):
  os.makedirs(root, exist_ok=True)
  axes = {k: v for k, v in sweeps}
  if seeds:
    axes[SEED_KEY] = seed_values(seeds)
  _write_json(os.path.join(root, SWEEP_FILE), {
      "config": config_arg, "script": runs[0].command[1] if runs else None, "mode": mode,
      "sweeps": axes, "seeds": int(seeds), "fixed": list(fixed),
      "runs": {r.name: r.overrides for r in runs}})


def _write_json(path: str, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _last_line(path: str) -> str:
  """The log's last `error:` line (the scripts' one-line errors), else its last line."""
  try:
    with open(path, errors="replace") as f:
      lines = [ln.strip() for ln in f.readlines()[-200:] if ln.strip()]
  except OSError:
    return ""
  errors = [ln for ln in lines if ln.startswith("error:")]
  return (errors or lines or [""])[-1]


def run_one(run: Run) -> int:
  """Runs `run` in its own process, output appended to its log.txt; returns the exit code.
  SIGTERM / SIGINT reach the run (it saves its checkpoint and stops), then end the sweep."""
  os.makedirs(run.workdir, exist_ok=True)
  t0 = time.time()
  with open(os.path.join(run.workdir, LOG_FILE), "a") as log:
    log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {launch_line(run)}\n")
    log.flush()
    proc = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT)
    forwarded = []

    def forward(signum, frame):
      forwarded.append(signum)
      proc.send_signal(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      rc = proc.wait()
    finally:
      for s, h in old.items():
        signal.signal(s, h)
  _write_json(os.path.join(run.workdir, STATUS_FILE), {
      "status": "done" if rc == 0 else "failed", "returncode": rc, "command": run.command[1:],
      "seconds": round(time.time() - t0, 1)})
  if forwarded:
    raise KeyboardInterrupt(f"stopped by signal {forwarded[0]} during {run.name}")
  return rc


def run_all(runs: list[Run], log: Callable[[str], None] = print) -> list[tuple[Run, str]]:
  """Runs the runs not done yet, one after the other; returns [(failed run, its error line)]."""
  failed = []
  for i, run in enumerate(runs):
    where = f"[{i + 1}/{len(runs)}] {run.name}"
    if is_done(run):
      log(f"{where}: done, skipped")
      continue
    log(f"{where}: running (log: {os.path.join(run.workdir, LOG_FILE)})")
    rc = run_one(run)
    if rc != 0:
      line = _last_line(os.path.join(run.workdir, LOG_FILE))
      failed.append((run, line))
      log(f"{where}: failed (exit {rc}): {line}")
  return failed
