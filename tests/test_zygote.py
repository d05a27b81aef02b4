"""The suite's zygote (tests/_site/ftjax_zygote.py): a script it runs sees what an ordinary
Python start gives it, and the command the test started exits as the script did."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_cli import ENV

SCRIPT = """
import json, os, signal, sys, time
mode = sys.argv[1]
if mode == "sigint":
  signal.signal(signal.SIGINT, lambda *a: (print("got SIGINT", flush=True), sys.exit(0)))
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0],
                  "env": {k: v for k, v in os.environ.items() if k != "FTJAX_TEST_NO_ZYGOTE"},
                  "name": __name__,
                  "pid": os.getpid(), "ppid": os.getppid(),
                  "sigint": str(signal.getsignal(signal.SIGINT))}), flush=True)
if mode == "exit3":
  sys.exit(3)
if mode == "raise":
  raise ValueError("boom")
if mode == "sigterm":
  os.kill(os.getpid(), signal.SIGTERM)
if mode in ("sigint", "sleep"):
  time.sleep(120)
"""


@pytest.fixture(scope="module")
def zygote():
  address = os.environ.get("FTJAX_TEST_ZYGOTE")
  if not address:
    pytest.skip("no zygote in this pytest process (FTJAX_TEST_NO_ZYGOTE, or a caller's XLA "
                "optimization level)")
  t0 = time.time()
  while not os.path.exists(address):  # it listens once its imports are done
    assert time.time() - t0 < 120, "the zygote did not come up"
    time.sleep(0.2)
  return address


def _start(tmp_path, mode, zygote_on=True):
  script = tmp_path / "probe.py"
  script.write_text(SCRIPT)
  env = dict(ENV)  # another environment would start the ordinary way
  if not zygote_on:
    env["FTJAX_TEST_NO_ZYGOTE"] = "1"
  return subprocess.Popen([sys.executable, str(script), mode], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _first(proc):
  return json.loads(proc.stdout.readline())


def test_a_worker_sees_what_an_ordinary_start_sees(zygote, tmp_path):
  runs = {}
  for on in (True, False):
    proc = _start(tmp_path, "exit3", on)
    runs[on] = _first(proc)
    proc.communicate(timeout=120)
    assert proc.returncode == 3
    # An ordinary start is the command itself; a worker is another process, the zygote's child.
    assert (runs[on]["pid"] != proc.pid) == on
  for key in ("argv", "cwd", "path0", "env", "name", "sigint"):
    assert runs[True][key] == runs[False][key], key


@pytest.mark.parametrize("mode,code,text", [("raise", 1, "ValueError: boom"),
                                            ("sigterm", -signal.SIGTERM, "")])
def test_the_command_exits_as_the_script_did(zygote, tmp_path, mode, code, text):
  proc = _start(tmp_path, mode)
  assert _first(proc)["pid"] != proc.pid
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == code, err
  assert text in err


def test_signals_reach_the_worker_and_a_killed_command_takes_it_along(zygote, tmp_path):
  proc = _start(tmp_path, "sigint")
  assert _first(proc)["pid"] != proc.pid
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "got SIGINT" in out
  proc = _start(tmp_path, "sleep")
  worker = _first(proc)["pid"]
  proc.kill()
  proc.wait(timeout=60)
  t0 = time.time()
  while os.path.exists(f"/proc/{worker}") and "Z" not in _state(worker):
    assert time.time() - t0 < 30, "the worker outlived its SIGKILLed command"
    time.sleep(0.01)


def _state(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0]
  except OSError:
    return "Z"
