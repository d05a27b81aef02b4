"""Workdir safety (issue 17): one run per workdir (a lock; a stale one is taken over), a damaged
latest checkpoint falls back to the newest whole one, a refused run writes nothing, changed data
is drift, and a workdir that is a file or a full disk during a save is one line."""

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest

import ftjax
from configs import sft as sft_config
from ftjax import checkpoint, provenance, workdir as wd
from ftjax.errors import UserError
from ftjax.train import sft
from tests.test_sft import _args, _cmd, make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
       "JAX_PLATFORMS": "cpu"}


def _config(base_dir, train, ev, steps):
  # What _args(base_dir, train, ev, steps, 2) gives on the command line.
  return make_config(base_dir, train, ev, steps=steps, save_every=2, eval_every=1000,
                     log_every=1)


@pytest.fixture(scope="module")
def trained(base_dir, chat_files, tmp_path_factory):
  """(workdir, train, eval) of a 4-step run saved at steps 2 and 4, on its own data copy."""
  d = tmp_path_factory.mktemp("safety")
  train, ev = str(d / "train.jsonl"), str(d / "eval.jsonl")
  shutil.copy(chat_files[0], train)
  shutil.copy(chat_files[1], ev)
  w = str(d / "trained")
  sft.run(_config(base_dir, train, ev, 4), w)
  return w, train, ev


def _copy(w, tmp_path, name) -> str:
  dst = str(tmp_path / name)
  shutil.copytree(w, dst)
  return dst


def _snapshot(w) -> dict:
  """Every file under `w` with its bytes (so any write shows)."""
  out = {}
  for dirpath, _, files in os.walk(w):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, w)] = fh.read()
  return out


def _popen(cmd):
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=ENV)


def _one_error(proc) -> str:
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
  assert len(lines) == 1, err[-3000:]
  return lines[0]


def _script(name, *args):
  return [sys.executable, os.path.join(ROOT, "experiments", name), *args]


def _dead_pid() -> int:
  return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True).stdout)


def test_lock_refuses_a_second_run_then_a_stale_lock_and_a_damaged_step_are_passed(
    trained, base_dir, tmp_path, caplog):
  w0, train, ev = trained
  w = _copy(w0, tmp_path, "w")
  host = socket.gethostname()

  # A run holds the workdir: a second one is refused in one line naming it, writing nothing.
  lock = wd.WorkdirLock(w).acquire()
  before = _snapshot(w)
  line = _one_error(_popen(_cmd(_args(base_dir, train, ev, 6, 2), w)))
  assert f"pid {os.getpid()} on host {host}" in line and w in line, line
  assert _snapshot(w) == before
  lock.release()
  assert not os.path.exists(os.path.join(w, ".lock"))
  # A rerun of a running sweep is refused the same way (its root is locked).
  root = str(tmp_path / "sweep")
  with wd.hold(root, multihost=False):
    sweep = _popen(_script("sweep.py", "--config=" + os.path.join(ROOT, "configs", "sft.py"),
                           f"--workdir={root}", "--sweep=optim.lr=1e-4,3e-4",
                           *_args(base_dir, train, ev, 2, 2)))
    line = _one_error(sweep)
    assert f"pid {os.getpid()} on host {host}" in line, line
    assert os.listdir(root) == [".lock"]

  # A lock file left by a dead run is taken over; the damaged step 4 (truncated array files,
  # as a full disk or a copy cut short leaves them) is skipped for step 2 with one warning
  # line, moved aside, and saved again.
  with open(os.path.join(w, ".lock"), "w") as f:
    json.dump({"pid": _dead_pid(), "host": host}, f)
  state = os.path.join(w, "checkpoints", "4", "state")
  arrays = [os.path.join(dp, f) for dp, _, fs in os.walk(state) for f in fs
            if os.path.basename(dp) == "d"]
  assert arrays
  for path in arrays:
    os.truncate(path, 64)
  res = subprocess.run(_cmd(_args(base_dir, train, ev, 6, 2), w), capture_output=True,
                       text=True, timeout=300, env=ENV)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Traceback" not in res.stderr, res.stderr[-3000:]
  warned = [ln for ln in res.stderr.splitlines() if "checkpoint unreadable" in ln]
  assert len(warned) == 1 and "step 4 (" in warned[0] and "from step 2" in warned[0], warned
  assert "resumed from step 2" in res.stderr
  names = os.listdir(os.path.join(w, "checkpoints"))
  assert {"4", "6"} <= set(names), names
  assert any(n.startswith("4.damaged-") for n in names), names
  assert not os.path.exists(os.path.join(w, ".lock"))

  # eval/export (load_trained): a deleted data/metadata of step 6 falls back to step 4, with
  # one warning and without touching the workdir; none readable is one line.
  os.remove(os.path.join(w, "checkpoints", "6", "data", "metadata"))
  listing = sorted(os.listdir(os.path.join(w, "checkpoints")))
  with caplog.at_level(logging.WARNING):
    _, params, _, _ = wd.load_trained(w)
  assert params
  warned = [r.getMessage() for r in caplog.records if "checkpoint unreadable" in r.getMessage()]
  assert len(warned) == 1 and "step 6 (FileNotFoundError" in warned[0], warned
  assert "using step 4" in warned[0], warned
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == listing
  for step in listing:
    if step.isdigit() and step != "6":
      os.remove(os.path.join(w, "checkpoints", step, "state", "_METADATA"))
  with pytest.raises(UserError, match="no checkpoint reads whole") as e:
    wd.load_trained(w)
  assert "\n" not in str(e.value) and "_METADATA is missing" in str(e.value)


def test_refused_runs_write_nothing(trained, base_dir, tmp_path, monkeypatch):
  w0, train, ev = trained
  # allow_drift with another base: the fingerprint refuses it before config.json is rewritten.
  other = str(tmp_path / "other_base")
  shutil.copytree(base_dir, other)
  model, params = ftjax.load_pretrained(other)
  params["final_norm"]["scale"] = params["final_norm"]["scale"] * 1.5
  ftjax.save_pretrained(model, params, other)
  w_base = _copy(w0, tmp_path, "w_base")
  before = _snapshot(w_base)
  # In-process (the one line cli.run prints is the UserError's text); the scripts run below.
  config = _config(other, train, ev, 6)
  config.allow_drift = True
  with pytest.raises(UserError) as e:
    sft.run(config, w_base)
  lines = {"base": str(e.value)}
  # A workdir that is a file.
  a_file = tmp_path / "a_file"
  a_file.write_text("mine\n")
  procs = {"file": _popen(_cmd(_args(base_dir, train, ev, 2, 2), str(a_file)))}
  # GRPO: a reward column missing from the data is found by a dry run, before any write.
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(4)))
  w_grpo = str(tmp_path / "w_grpo")
  procs["grpo"] = _popen(_script("grpo.py", "--config=" + os.path.join(ROOT, "configs",
                                                                       "grpo.py"),
                                 f"--workdir={w_grpo}", "--config.model.tokenizer=x",
                                 f"--config.data.path={prompts}"))
  lines.update({name: _one_error(p) for name, p in procs.items()})
  assert "\n" not in lines["base"]
  assert "changed" in lines["base"] and other in lines["base"], lines["base"]
  assert _snapshot(w_base) == before
  assert f"--workdir={a_file}" in lines["file"] and "is a file" in lines["file"], lines["file"]
  assert a_file.read_text() == "mine\n"
  assert "'answer'" in lines["grpo"] and "column" in lines["grpo"], lines["grpo"]
  assert not os.path.exists(w_grpo)

  # Changed data rows are drift: refused naming the file, nothing written.
  (first,) = json.load(open(os.path.join(w0, "run.json")))["runs"]
  assert first["data_hashes"][train] == provenance.data_hashes(
      _config(base_dir, train, ev, 4))[train]
  w_data = _copy(w0, tmp_path, "w_data")
  before = _snapshot(w_data)
  saved = open(train).read()
  try:
    rows = saved.splitlines()
    with open(train, "w") as f:
      f.write("\n".join(rows[1:] + rows[:1]) + "\n")
    with pytest.raises(UserError) as e:
      sft.run(_config(base_dir, train, ev, 6), w_data)
    line = str(e.value)
    assert "\n" not in line
  finally:
    with open(train, "w") as f:
      f.write(saved)
  assert train in line and "data file changed" in line and "allow_drift" in line, line
  assert _snapshot(w_data) == before

  # A workdir with a config but no checkpoint is a fresh start: a changed config is accepted.
  fresh = str(tmp_path / "fresh")
  wd.save_config(sft_config.get_config("smoke"), fresh)
  changed = sft_config.get_config("smoke")
  changed.optim.lr = 0.5
  assert provenance.check_resume(changed, fresh) == {}
  # A workdir on a read-only disk (os.access says so; tests run as root) is one line.
  monkeypatch.setattr(os, "access", lambda path, mode: False)
  with pytest.raises(UserError, match="not writable"):
    wd.check_writable(str(tmp_path / "ro" / "w"))


def test_full_disk_during_a_save_is_one_line_and_resumable(base_dir, tmp_path, monkeypatch,
                                                           trained, caplog):
  _, train, ev = trained
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
  save_fn = jh.JsonCheckpointHandler._save_fn

  async def full(self, x, directory):
    if "/4.orbax-checkpoint-tmp" in str(directory):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await save_fn(self, x, directory)
  monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", full)
  w = str(tmp_path / "w")
  with caplog.at_level(logging.ERROR):
    with pytest.raises(UserError) as e:
      # 4 steps: the save at step 4 is the run's last, and the schedule (so the compiled
      # step) is the `trained` fixture's.
      sft.run(_config(base_dir, train, ev, 4), w)
  msg = str(e.value)
  assert "\n" not in msg and os.path.join(w, "checkpoints") in msg, msg
  assert "cannot save step 4 (No space left on device)" in msg and "step 2, is kept" in msg, msg
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no orbax tracebacks
  with checkpoint.Checkpointer(w, async_save=False) as ckpt:
    assert ckpt.all_steps() == [2]
  monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", save_fn)  # space freed
  out = sft.run(_config(base_dir, train, ev, 4), w)
  assert out["step"] == 4


_HOST = """
import sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from ftjax import workdir as wd
from ftjax.errors import UserError
try:
  with wd.hold(sys.argv[3]):
    said = "held"
except UserError as e:
  said = f"refused: {e}"
with open(sys.argv[4], "w") as f:  # not stdout: gloo's own lines interleave there
  f.write(said)
"""


def test_multihost_processes_share_the_lock_of_process_0(tmp_path):
  """Two JAX processes on one workdir: process 0 alone locks it (orbax's multi-host saving
  needs both in it); when another run holds it, both are refused, neither waits."""
  from tests.test_cli import two_hosts
  w = str(tmp_path / "w")

  assert two_hosts(_HOST, tmp_path, w) == ["held", "held"]
  with wd.hold(w):
    out = two_hosts(_HOST, tmp_path, w)
  assert out[0].startswith("refused:") and f"pid {os.getpid()}" in out[0], out
  assert out[1].startswith("refused:") and "process 0" in out[1], out
