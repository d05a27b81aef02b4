"""The experiment scripts' command line: one-line errors, nothing written on bad input, Ctrl-C
saves and says how to resume, --print_config, and a signal on one host stops every host."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from configs import demo as demo_config, dpo as dpo_config, reward as reward_config
from configs import sft as sft_config
from ftjax import cli, workdir as wd
from ftjax.errors import UserError
from tests.test_sft import _args, _cmd, _latest, _wait_for_new_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
       "JAX_PLATFORMS": "cpu"}


def _script(name, *args):
  return [sys.executable, os.path.join(ROOT, "experiments", name), *args]


def _error_lines(stderr: str) -> list[str]:
  return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_bad_input_is_one_line_and_writes_nothing(base_dir, chat_files, tmp_path):
  train, ev = chat_files
  bad_json = tmp_path / "bad.jsonl"
  with open(train) as f:
    rows = f.read().splitlines()
  bad_json.write_text("\n".join(rows[:2] + ['{"messages": [}'] + rows[2:]) + "\n")
  no_data = [a for a in _args(base_dir, train, ev, 2, 1) if "data." not in a]
  sft = lambda extra, w: _cmd(_args(base_dir, train, ev, 2, 1) + extra, w)  # noqa: E731
  # name -> (command, what the one error line must name)
  cases = {
      "typo": (sft(["--config.train.stpes=10"], "{w}"), ["config.train.stpes", "steps"]),
      "arg_key": ([*_script("sft.py"), "--config=" + os.path.join(ROOT, "configs", "sft.py")
                   + ":adaptr=lora", "--workdir={w}"], ["adaptr", "adapter, quant"]),
      "missing_file": (sft(["--config.data.path=/nonexistent/train.jsonl"], "{w}"),
                       ["/nonexistent/train.jsonl"]),
      "no_data_path": (_cmd(no_data, "{w}"), ["config.data.path"]),
      "bad_json_row": (sft([f"--config.data.path={bad_json}"], "{w}"),
                       ["bad.jsonl", "row 3", "JSON"]),
      "export_no_ckpt": (_script("export.py", "--workdir={w0}", "--out={w}"),
                         ["no checkpoint"]),
  }
  # A workdir that holds a config but no checkpoint (a run stopped before its first save).
  w0 = str(tmp_path / "w0")
  wd.save_config(sft_config.get_config("smoke"), w0)
  procs = {}
  for name, (cmd, _) in cases.items():
    cmd = [c.format(w=str(tmp_path / name), w0=w0) for c in cmd]
    procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=ENV)
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, (name, err[-3000:])
    assert "Traceback" not in err and "cannot schedule new futures" not in err, (name, err)
    lines = _error_lines(err)
    assert len(lines) == 1, (name, err[-3000:])
    for needle in cases[name][1]:
      assert needle in lines[0], (name, lines[0])
    assert not os.path.exists(tmp_path / name), (name, os.listdir(tmp_path / name))
  assert os.listdir(w0) == ["config.json"]  # export did not create checkpoints/ there


def test_internal_errors_keep_their_traceback(monkeypatch, capsys):
  """Only UserError is one line: a plain ValueError (a bug) propagates with its traceback."""
  from absl import flags

  def bug(argv):
    raise ValueError("a bug")

  def user(argv):
    raise UserError("config.x: bad\nsecond line")

  monkeypatch.setattr(sys, "argv", ["prog"])
  define = lambda: None  # noqa: E731
  with pytest.raises(ValueError, match="a bug"):
    cli.run(bug, define)
  flags.FLAGS.unparse_flags()
  with pytest.raises(SystemExit) as e:
    cli.run(user, define)
  assert e.value.code == 1
  assert capsys.readouterr().err == "error: config.x: bad\n"


def test_user_error_is_the_last_line_even_when_a_thread_logs_at_exit():
  """A thread still running when the error line is printed (orbax's commit threads were seen
  logging "cannot schedule new futures after shutdown" with a traceback at exit) prints nothing
  after it; without the mute, its traceback follows the line."""
  code = textwrap.dedent("""
      import logging, sys, threading, time
      from ftjax import cli
      from ftjax.errors import UserError
      def late():
        time.sleep(0.5)
        try:
          raise RuntimeError("cannot schedule new futures after shutdown")
        except RuntimeError:
          logging.exception("background commit failed")
        print("late stderr", file=sys.stderr)
      def main(argv):
        threading.Thread(target=late).start()
        raise UserError("--step=best: no eval_loss")
      cli.run(main, lambda: None)
      """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                        timeout=120)
  assert proc.returncode == 1
  assert proc.stderr == "error: --step=best: no eval_loss\n", proc.stderr


def test_config_arg_keys_are_checked_and_documented():
  for mod, keys in [(sft_config, ["model", "adapter", "quant", "format", "smoke"]),
                    (dpo_config, ["loss", "adapter", "smoke"]),
                    (reward_config, ["adapter", "smoke"]),
                    (demo_config, ["stage", "smoke"])]:
    with pytest.raises(UserError, match="unknown arg key 'bogus'.*known keys: .*smoke"):
      mod.get_config("smoke,bogus=1")
    for k in keys:
      assert k in mod.__doc__ and k in mod.ARG_KEYS, (mod.__name__, k)
  assert dpo_config.get_config("loss=ipo,smoke").dpo.loss_type == "ipo"
  with pytest.raises(UserError, match="'loss'"):  # a reward model has no DPO loss
    reward_config.get_config("loss=ipo")


def test_print_config_shows_overrides(tmp_path):
  res = subprocess.run(
      _script("dpo.py", "--config=" + os.path.join(ROOT, "configs", "dpo.py") + ":loss=ipo,smoke",
              "--config.train.steps=7", "--print_config"),
      capture_output=True, text=True, timeout=300, env=ENV)
  assert res.returncode == 0, res.stderr[-2000:]
  cfg = json.loads(res.stdout)
  assert cfg["train"]["steps"] == 7 and cfg["dpo"]["loss_type"] == "ipo"
  assert cfg["adapter"]["kind"] == "lora"


def test_ctrl_c_saves_and_says_how_to_resume(base_dir, chat_files, tmp_path):
  train, ev = chat_files
  w = str(tmp_path / "run")
  # test_sft's interrupted run's flags (30 steps, saved every 4): its compiled step, from the
  # session's compile cache; the signal comes right after the first save, steps before the end.
  proc = subprocess.Popen(_cmd(_args(base_dir, train, ev, 30, 4), w), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=ENV)
  assert _wait_for_new_checkpoint(proc, w, 0), proc.stderr.read()[-2000:]
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert "SIGINT" in last and "rerun the same command to resume" in last, last
  assert 4 <= _latest(w) < 30  # the step it stopped at was saved


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


EXIT_GRACE = 15  # s, from a host's answer to its exit


def two_hosts(script: str, tmp_path, *args: str) -> list:
  """Runs `python -c script ADDR I ARGS... ANSWER` as JAX processes 0 and 1 on one coordinator;
  the script writes its answer to the file ANSWER (its last argument) as its last act. Returns
  the two answers; fails with the stderr of a host that gave none or exited non-zero.

  Once both answered, what is left is jax's exit: about 1 run in 10 here, the CPU client's
  teardown waits ~150 s to join an idle pool thread that missed its wakeup (gdb, 2026-12-07),
  and the other host waits for it at the shutdown barrier. Hosts still there EXIT_GRACE s after
  answering are killed, and their exit codes are not the test's."""
  addr = f"localhost:{_free_port()}"
  answers = [str(tmp_path / f"answer{i}") for i in range(2)]
  for f in answers:
    if os.path.exists(f):
      os.remove(f)
  procs = [subprocess.Popen([sys.executable, "-c", script, addr, str(i), *args, answers[i]],
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
           for i in range(2)]
  deadline = time.monotonic() + 240  # slow on a loaded 2-core machine
  while (time.monotonic() < deadline
         and any(p.poll() is None and not os.path.exists(f) for p, f in zip(procs, answers))):
    time.sleep(0.1)
  try:
    outs, stalled = [p.communicate(timeout=EXIT_GRACE) for p in procs], False
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    outs, stalled = [p.communicate() for p in procs], True
  for p, f, (_, err) in zip(procs, answers, outs):
    assert os.path.exists(f) and (stalled or p.returncode == 0), err[-2000:]
  return [open(f).read() for f in answers]


_WORKER = """
import os, signal, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from ftjax import checkpoint
with checkpoint.PreemptionHandler() as preempt:
  step = 0
  while step < 1000:
    step += 1
    if jax.process_index() == 1 and step == 3:
      os.kill(os.getpid(), signal.SIGINT)  # only this host gets Ctrl-C
    if preempt.any_requested():
      break
with open(sys.argv[3], "w") as f:  # not stdout: gloo's own lines interleave there
  f.write(f"stopped at step {step} by signal {preempt.signum}")
"""


def test_signal_on_one_host_stops_every_host_at_the_same_step(tmp_path):
  last = two_hosts(_WORKER, tmp_path)
  assert last == [f"stopped at step 3 by signal {int(signal.SIGINT)}"] * 2
