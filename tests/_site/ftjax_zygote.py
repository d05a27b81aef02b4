"""A warm Python for the scripts the tests start (`python experiments/sft.py ...`).

Each of the suite's ~100 script runs would spend about 3 CPU-s importing jax, flax, orbax,
transformers' tokenizer and ftjax before its first line of work. A zygote (one per pytest
process, started by tests/conftest.py) imports them once, and forks a worker for each run:

- The command the test starts is still a real Python process (the *launcher*): its
  sitecustomize (`launch()`, here) sends the zygote its argv, environment, working directory,
  sys.path, signal dispositions and its stdin/stdout/stderr, then waits. The worker runs the
  script on those files, as `__main__`, with that environment.
- The launcher forwards the signals a test sends it (SIGINT, SIGTERM, ...) to the worker, and
  exits as the worker did: its exit code, or killed by the same signal. A launcher killed
  outright (SIGKILL) takes its worker with it: the zygote sees the launcher's connection close
  and kills the worker (SIGKILL); and the worker holds the read end of a pipe only the launcher
  writes to, and kills itself when it reads EOF.
- Anything the zygote cannot reproduce exactly runs the ordinary way: another environment
  (beyond PYTHONPATH and the test's name), another sys.path, interpreter options, `-c`/`-m`,
  a closed standard stream, a zygote not up yet or gone. FTJAX_TEST_NO_ZYGOTE=1 opts a command
  out (the kill/resume tests time their signals against a cold start).

The zygote forks only while no thread but OpenBLAS's pool (which re-forms itself in a forked
child) runs beside its own (it checks): the imports start none, and it never initializes a jax
backend, so each worker starts its own, as a fresh process would.
"""

import json
import os
import select
import signal
import socket
import struct
import sys

ENV = "FTJAX_TEST_ZYGOTE"
OPT_OUT = "FTJAX_TEST_NO_ZYGOTE"
# Environment keys that may differ between the zygote and a launcher: the test's name, the
# zygote's address, PYTHONPATH (sys.path is compared instead), the shell's own, and two that
# imports in the pytest process set for themselves (tensorboardX: CRC32C_SW_MODE=auto, its
# default; torch's inductor: its cache dir), which a worker gets in its environment all the same.
IGNORED_ENV = {"PYTEST_CURRENT_TEST", ENV, "PYTHONPATH", "PWD", "OLDPWD", "_", "SHLVL",
               "CRC32C_SW_MODE", "TORCHINDUCTOR_CACHE_DIR"}
SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
PRELOAD = ("numpy", "jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint",
           "absl.app", "absl.flags", "ml_collections", "tokenizers", "safetensors.numpy",
           "jinja2", "ftjax")


def _send(sock, obj, fds=()):
  data = json.dumps(obj).encode()
  payload = struct.pack("!I", len(data)) + data
  if fds:
    socket.send_fds(sock, [payload], list(fds))
  else:
    sock.sendall(payload)


def _tell(conn, obj) -> None:
  """`_send` to a launcher that may be gone (killed): then there is no one to tell."""
  try:
    _send(conn, obj)
  except OSError:
    pass


def _recv(sock, max_fds=0):
  head, fds, fds_got = b"", [], []
  while len(head) < 4:
    if max_fds and not fds_got:
      chunk, fds_got, _, _ = socket.recv_fds(sock, 4 - len(head), max_fds)
      fds = list(fds_got)
    else:
      chunk = sock.recv(4 - len(head))
    if not chunk:
      raise EOFError
    head += chunk
  (n,) = struct.unpack("!I", head)
  data = b""
  while len(data) < n:
    chunk = sock.recv(n - len(data))
    if not chunk:
      raise EOFError
    data += chunk
  return json.loads(data), fds


def _dispositions() -> dict:
  out = {}
  for name in SIGNALS:
    h = signal.getsignal(getattr(signal, name))
    out[name] = ("ign" if h == signal.SIG_IGN else "py" if h is signal.default_int_handler
                 else "dfl")
  return out


def _comparable_env(env: dict) -> dict:
  return {k: v for k, v in env.items() if k not in IGNORED_ENV}


def _norm_path(path) -> list:
  return sorted({os.path.abspath(p) for p in path if p})


# ------------------------------------------------------------------------------ the launcher


def launch() -> None:
  """Called by sitecustomize at the start of every Python the tests start: runs this command
  in a worker of the zygote and exits as it did, or returns (the ordinary start)."""
  address = os.environ.get(ENV)
  if not address or os.environ.get(OPT_OUT) or sys.flags.interactive:
    return
  argv, orig = list(sys.argv), list(getattr(sys, "orig_argv", []))
  if (len(orig) != len(argv) + 1 or orig[1:] != argv or not argv[0].endswith(".py")
      or not os.path.isfile(argv[0])):
    return
  signums = {getattr(signal, name) for name in SIGNALS}
  dispositions = _dispositions()
  # Until the worker's pid is known, a signal waits (then goes to the worker, or, if the zygote
  # refuses, is delivered here as at any Python's start).
  signal.pthread_sigmask(signal.SIG_BLOCK, signums)
  try:
    for fd in (0, 1, 2):
      os.fstat(fd)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
  except OSError:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)
    return
  alive_r, alive_w = os.pipe()
  try:
    _send(sock, {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(),
                 "path": list(sys.path), "signals": dispositions},
          fds=(0, 1, 2, alive_r))
    os.close(alive_r)
    reply, _ = _recv(sock)
  except (OSError, EOFError, ValueError):
    reply = {}
  if "pid" not in reply:  # refused (or the zygote is gone): start the ordinary way
    sock.close()
    os.close(alive_w)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)
    return
  pid = reply["pid"]

  def forward(signum, frame):
    try:
      os.kill(pid, signum)
    except ProcessLookupError:
      pass

  for signum in signums:  # also the ones this process ignores: the worker decides, as the
    signal.signal(signum, forward)  # script's own handlers would (a shell's background job
    # ignores SIGINT, and ftjax's runs install a handler for it all the same)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)
  try:
    status = _recv(sock)[0]["status"]
  except (OSError, EOFError, ValueError):
    os._exit(1)  # the zygote died: the worker was killed with it
  if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    os._exit(1)
  os._exit(os.waitstatus_to_exitcode(status))


# -------------------------------------------------------------------------------- the zygote


class _Job:
  """What a forked worker runs, at the zygote's top level (so SystemExit and uncaught
  exceptions end the process as they would end the script's own)."""

  def __init__(self, request: dict, alive_fd: int):
    self.request, self.alive_fd = request, alive_fd

  def run(self) -> None:
    import runpy
    import threading
    r = self.request

    def watch():
      while True:
        try:
          if not os.read(self.alive_fd, 1):
            break
        except InterruptedError:
          continue
        except OSError:
          break
      os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="zygote-launcher-watch", daemon=True).start()
    script = os.path.abspath(r["argv"][0])
    sys.argv = list(r["argv"])
    sys.path[:] = [os.path.dirname(script)] + list(r["path"])
    runpy.run_path(script, run_name="__main__")


def _worker(conn, listener, request, fds) -> _Job:
  stdin, stdout, stderr, alive = fds
  listener.close()
  conn.close()
  for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
    os.dup2(fd, target)
  for fd in (stdin, stdout, stderr):
    if fd > 2:
      os.close(fd)
  os.set_inheritable(alive, False)
  os.environ.clear()
  os.environ.update(request["env"])
  os.chdir(request["cwd"])
  for name, how in request["signals"].items():
    signal.signal(getattr(signal, name), {"ign": signal.SIG_IGN, "dfl": signal.SIG_DFL,
                                          "py": signal.default_int_handler}[how])
  signal.signal(signal.SIGCHLD, signal.SIG_DFL)
  return _Job(request, alive)


def _same_modules(request: dict, path: list, root: str) -> bool:
  """Whether the launcher would import what the zygote imported: the same sys.path, where the
  repository (`root`, which the zygote imported ftjax from) may be missing if the script is one
  of its experiments/ (each puts the repository first on sys.path itself)."""
  theirs = set(_norm_path(request["path"]))
  script = os.path.abspath(request["argv"][0])
  if root not in theirs and os.path.dirname(os.path.dirname(script)) != root:
    return False
  return theirs - {root} == set(path) - {root}


def _threads() -> int:
  return len(os.listdir("/proc/self/task"))


def serve(address: str, parent: int):
  """Imports PRELOAD, then forks a worker per launcher until the process `parent` (the pytest
  process that started it) is gone. Returns a `_Job` in a worker only."""
  import importlib
  path = _norm_path(sys.path[1:])  # [0] is this file's directory
  import threading

  import numpy  # noqa: F401 -- OpenBLAS starts its pool here; it re-forms it in a child (atfork)
  blas = _threads()
  for name in PRELOAD:
    importlib.import_module(name)
  import pkgutil

  import ftjax
  for info in pkgutil.walk_packages(ftjax.__path__, "ftjax."):
    importlib.import_module(info.name)
  from transformers import PreTrainedTokenizerFast  # noqa: F401 -- the tokenizer loader's
  # After the imports: jax sets TF_CPP_MIN_LOG_LEVEL and TPU_SKIP_MDS_QUERY when imported, as
  # it did in the pytest process the launchers' environments come from.
  env = _comparable_env(os.environ)
  root = os.path.dirname(os.path.dirname(os.path.abspath(ftjax.__file__)))
  if threading.active_count() != 1 or _threads() != blas:
    # Forking would copy locks other threads hold: launchers start the ordinary way.
    print(f"ftjax_zygote: {_threads()} threads after the imports ({blas} after numpy's); "
          "not serving", file=sys.stderr)
    return None
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(address + ".tmp")
  os.rename(address + ".tmp", address)  # launchers connect only once it listens
  listener.listen(64)
  waiting = {}  # worker pid -> the launcher's connection
  while True:
    try:
      ready, _, _ = select.select([listener, *waiting.values()], [], [], 0.02)
    except InterruptedError:
      ready = []
    for pid, conn in list(waiting.items()):
      if conn in ready:  # a launcher says nothing: this is its end (killed outright)
        try:
          gone = not conn.recv(1)
        except OSError:
          gone = True
        if gone:
          try:
            os.kill(pid, signal.SIGKILL)  # at once, not when the worker's watch thread runs
          except ProcessLookupError:
            pass
          waiting.pop(pid)
          conn.close()
    if listener in ready:
      conn, _ = listener.accept()
      try:
        request, fds = _recv(conn, max_fds=4)
      except (OSError, EOFError, ValueError):
        conn.close()
        continue
      why = ("fds" if len(fds) != 4 else
             "env: " + " ".join(sorted(k for k in set(env) | set(_comparable_env(request["env"]))
                                       if env.get(k) != request["env"].get(k)))
             if _comparable_env(request["env"]) != env else
             "sys.path" if not _same_modules(request, path, root) else None)
      print(f"ftjax_zygote: {os.path.basename(request['argv'][0])}: "
            + (f"refused ({why})" if why else "forked"), file=sys.stderr, flush=True)
      if why:
        for fd in fds:
          os.close(fd)
        _tell(conn, {"refused": True})
        conn.close()
        continue
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        for c in waiting.values():
          c.close()
        return _worker(conn, listener, request, fds)
      for fd in fds:
        os.close(fd)
      _tell(conn, {"pid": pid})
      waiting[pid] = conn
    while True:  # reap every finished worker (also those whose launcher is gone)
      try:
        pid, status = os.waitpid(-1, os.WNOHANG)
      except ChildProcessError:
        break
      if pid == 0:
        break
      conn = waiting.pop(pid, None)
      if conn is not None:
        _tell(conn, {"status": status})
        conn.close()
    if os.getppid() != parent:  # the pytest process is gone
      return None


if __name__ == "__main__":
  job = serve(sys.argv[1], int(sys.argv[2]))
  if job is not None:
    del serve
    job.run()
