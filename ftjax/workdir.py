"""A run's workdir: its files (config.json, run.json, checkpoints, the lock) and the way back
from them to a trained model.

`load_trained` rebuilds the model from a workdir's saved config (through train/setup.py) and
restores its latest (or best) checkpoint over it; `load_reward_model` is the one reward-model
loader (a reward workdir or an HF *ForSequenceClassification directory).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import json
import os
import shutil
import socket
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import logging

from ftjax import checkpoint, hf, partition, provenance
from ftjax.errors import UserError
from ftjax.train import common, setup

def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds a checkpoint directory from an earlier run (reads only)."""
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


# ------------------------------------------------------------------------------------------------
# One run per workdir

LOCK_FILE = ".lock"
# What a run that was refused before it started may have made in a workdir it created, besides
# its lock: the tokenized data and orbax's empty checkpoints/; anything else (a GRPO warm start)
# is kept.
_UNDO = ("data_cache", "checkpoints")


def check_writable(workdir: str):
  """A UserError naming the path when `workdir` is a file or cannot be written (a read-only
  disk, no permission), so that the run stops before any work."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"--workdir={workdir}: is a file, not a directory")
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise UserError(f"--workdir={workdir}: {probe} is a file, not a directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise UserError(f"--workdir={workdir}: {probe} is not writable (a read-only disk, or no "
                    "permission)")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # EPERM: it exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """An exclusive `flock` on `workdir`/.lock, held for a run's life, with the holder's pid and
  host written into the file.

  The kernel drops a flock when its holder exits however it ends (SIGKILL included), so a lock
  file left by a dead run is simply taken over. The file is removed on release; a process that
  opened it just before is caught by the inode check and opens the new one. With several JAX
  processes only process 0 locks (they share the workdir and orbax coordinates their saves);
  the others learn the outcome from it.
  """

  def __init__(self, workdir: str, multihost: bool = True):
    self.workdir, self.multihost = workdir, multihost
    self.path = os.path.join(workdir, LOCK_FILE)
    self.fd: Optional[int] = None
    self.created: Optional[str] = None  # the topmost directory this run made, if any
    self.started = False  # set by start_run: from then on the workdir is the run's

  def _holder(self) -> str:
    try:
      with open(self.path) as f:
        info = json.load(f)
      pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
      return "another process (its lock file holds no pid)"
    where = f"pid {pid} on host {host}"
    if host == socket.gethostname() and not _alive(pid):
      where += " (not running; a process it started still holds the lock)"
    return where

  def _lock(self):
    path = os.path.abspath(self.workdir)
    top = path
    while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
      top = os.path.dirname(top)
    try:
      existed = os.path.exists(path)
      os.makedirs(path, exist_ok=True)
      if not existed:
        self.created = top
      while True:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
          os.close(fd)
          if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            # No flock here (some network disks): run unlocked rather than not at all.
            logging.warning("%s: cannot lock (%s); not guarding against a second run",
                            self.path, e)
            return
          raise UserError(f"{self.workdir}: in use by another run ({self._holder()}, lock "
                          f"{self.path}); wait for it to end, stop it, or use another "
                          "--workdir") from None
        try:
          same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
          same = False
        if same:
          break
        os.close(fd)  # the holder released and removed it meanwhile: lock the new file
      self.fd = fd
      info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "since": datetime.datetime.now(datetime.timezone.utc).isoformat()})
      os.ftruncate(fd, 0)
      os.pwrite(fd, (info + "\n").encode(), 0)
    except OSError as e:
      raise UserError(f"--workdir={self.workdir}: cannot write there ({e.strerror or e})") from None

  def acquire(self) -> "WorkdirLock":
    error = None
    if not self.multihost or jax.process_index() == 0:
      try:
        self._lock()
      except UserError as e:
        error = e
    if self.multihost and jax.process_count() > 1:  # every process stops, or none
      from jax.experimental import multihost_utils
      refused = multihost_utils.process_allgather(np.asarray(error is not None, np.int32))
      if np.asarray(refused).any() and error is None:
        raise UserError(f"{self.workdir}: in use by another run (see process 0's error)")
    if error is not None:  # the holder's workdir now: nothing here is ours to undo
      raise error
    return self

  def undo(self):
    """After a refusal, still holding the lock: removes what this run made in a workdir it
    created (nothing else), then the lock and the emptied directories."""
    if self.created is None:
      self.release()
      return
    path = os.path.abspath(self.workdir)
    for name in _UNDO:
      p = os.path.join(path, name)
      if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
      elif os.path.lexists(p):
        os.remove(p)
    self.release()
    d = path
    while True:
      try:
        os.rmdir(d)
      except OSError:
        return
      if d == self.created:
        return
      d = os.path.dirname(d)

  def release(self):
    if self.fd is None:
      return
    try:
      if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
        os.remove(self.path)
    except OSError:
      pass
    os.close(self.fd)
    self.fd = None


_HELD: dict = {}


@contextlib.contextmanager
def hold(workdir: str, multihost: bool = True):
  """Holds the workdir's lock inside the block; a block that fails before `start_run` (a
  refused run) leaves no trace in a workdir it created. `multihost=False` locks without
  asking JAX which process this is (a sweep's parent process must not start a backend)."""
  key = os.path.abspath(workdir)
  lock = WorkdirLock(workdir, multihost).acquire()
  _HELD[key] = lock
  try:
    yield lock
  except BaseException:
    if not lock.started:
      lock.undo()
    raise
  finally:
    lock.release()
    _HELD.pop(key, None)


def exclusive(run: Callable) -> Callable:
  """Decorates an experiment's `run(config, workdir)`: the workdir is checked to be a writable
  directory, then locked for the run's life (one run per workdir at a time)."""

  @functools.wraps(run)
  def locked_run(config, workdir: str, *args, **kwargs):
    check_writable(workdir)
    if setup._get(setup._get(config, "mesh", {}), "distributed", False):
      setup.init_distributed()  # the lock needs to know process 0
    with hold(workdir):
      return run(config, workdir, *args, **kwargs)
  return locked_run


def save_config(config, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, os.path.join(workdir, "config.json"))


def check_resume(config, workdir: str) -> dict:
  """Refuses (UserError) a resume whose config drifted from the saved one; see provenance."""
  return provenance.check_resume(config, workdir)


def start_run(config, workdir: str, diff: Optional[dict] = None):
  """Saves the config and appends this attempt to run.json: call it once the config, model
  and data are checked, so a run that fails validation writes nothing."""
  resumed = has_checkpoints(workdir)
  if diff is None:
    diff = check_resume(config, workdir)
  lock = _HELD.get(os.path.abspath(workdir))
  if lock is not None:
    lock.started = True
  save_config(config, workdir)
  provenance.record_run(config, workdir, diff, resumed)


def load_config(workdir: str):
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{path}: missing; not an ftjax workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_trained(workdir: str, step: Any = None):
  """(model, params, tokenizer, config) of a workdir's checkpoint (latest, "best", or a step).

  The base is rebuilt from the saved config (and checked against the fingerprint recorded at
  training time); the checkpoint's trainable params are merged over it.
  """
  config = load_config(workdir)
  # Checked before the Checkpointer, which would create an empty checkpoints/ here.
  if not has_checkpoints(workdir):
    raise UserError(f"{workdir}: no checkpoint to restore (the run saved none yet)")
  if step not in (None, "best") and not str(step).isdigit():
    raise UserError(f"step={step!r}: expected a step number or 'best'")
  model, params, tok, base_ref = setup.build_model(config)
  extra_rules = []
  if "ppo" in config:  # PPO trains a value head or critic beside the policy
    rm = (load_reward_model(config.ppo.reward_model, model) if config.ppo.critic == "separate"
          else None)
    params, extra_rules, _ = setup.add_critic(config, model, params, rm)
  trainable, frozen, _ = common.split_params(params, extra_rules + setup.rules(config))
  ckpt = checkpoint.Checkpointer(workdir, keep=int(config.train.keep), async_save=False)
  try:
    if step == "best":
      step = ckpt.best_step() or ckpt.latest_step()
    elif step is not None:
      step = int(step)
      if step not in ckpt.all_steps():
        raise UserError(f"{workdir}: no checkpoint for step {step} (have {ckpt.all_steps()})")
    if ckpt.latest_step() is None:
      raise UserError(f"{workdir}: no checkpoint to restore")
    _, tx = setup.optimizer(config)
    target = jax.eval_shape(lambda: common.init_state(trainable, tx, int(config.train.seed)))
    if step is None:  # the newest that reads whole; a damaged newer one is named, not moved
      got, state, _, extra, skipped = ckpt.restore_readable(target=target)
      if skipped:
        logging.warning("checkpoint unreadable, using step %d instead: %s (in %s)", got,
                        "; ".join(f"step {s} ({r})" for s, r in skipped), ckpt.directory)
    else:
      try:
        state, _, extra = ckpt.restore(step, target=target)
      except UserError:
        raise
      except Exception as e:  # noqa: BLE001 -- a damaged step: one line, not a traceback
        raise UserError(f"{ckpt.directory}/{step}: unreadable ({checkpoint.short_reason(e)}); "
                        "pick another --step") from None
  finally:
    ckpt.close()
  if base_ref.get("kind") == "hf":
    checkpoint.check_base(extra, base_ref["path"])
  params = partition.merge(state["params"], frozen)
  if "ppo" in config:  # the policy alone
    params = {k: v for k, v in params.items() if k not in setup.HEAD_KEYS}
  return model, params, tok, config


def load_reward_model(path: str, policy):
  """(model, params) of an experiments/reward.py workdir or an HF *ForSequenceClassification
  directory; it scores the policy's tokens, so the vocabularies must agree."""
  if not path:
    raise UserError("config.ppo.reward_model is required: a workdir of experiments/reward.py or "
                    "an HF *ForSequenceClassification directory")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    model, params, _, _ = load_trained(path)
  elif os.path.isfile(os.path.join(path, "config.json")):
    extra = {} if policy.cfg.pad_token_id is None else {"pad_token_id": policy.cfg.pad_token_id}
    model, params = hf.load_pretrained(path, **extra)
  else:
    raise UserError(f"config.ppo.reward_model={path!r}: neither a reward workdir nor an HF "
                    "model directory")
  if model.cfg.head != "score":
    raise UserError(f"config.ppo.reward_model={path!r}: not a reward model (no score head)")
  if model.cfg.vocab_size != policy.cfg.vocab_size:
    raise UserError(f"config.ppo.reward_model={path!r}: vocabulary {model.cfg.vocab_size} != the "
                    f"policy's {policy.cfg.vocab_size} (PPO needs the policy's tokenizer)")
  return model, params
