"""From a config to a model, and from a workdir back to a trained model.

Shared by the experiment scripts: `build_model` makes (model, params, tokenizer) from the
config's `model`, `adapter` and `quant` sections; `load_trained` rebuilds the same model from a
workdir's saved config and restores its latest (or best) checkpoint over it.
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
from ftjax.config import (ADAPTER_DTYPES, MATMUL_PRECISIONS, LoraConfig, PrefixConfig,
                          get_preset)
from ftjax.errors import UserError
from ftjax.model import AdapterSpec, Decoder, init_params
from ftjax.quant import QuantConfig
from ftjax.tokenizer import load_tokenizer
from ftjax.train import common

ADAPTER_KINDS = ("none", "lora", "prefix", "prompt")


def _get(c, key, default=None):
  return c.get(key, default) if hasattr(c, "get") else getattr(c, key, default)


def adapter_spec(config) -> AdapterSpec:
  a, q = config.adapter, config.quant
  kind = a.kind
  if kind not in ADAPTER_KINDS:
    raise UserError(f"config.adapter.kind={kind!r}: expected one of {ADAPTER_KINDS}")
  if q.kind not in ("none", "nf4", "int4"):
    raise UserError(f"config.quant.kind={q.kind!r}: expected none, nf4 or int4")
  if q.kind != "none" and kind == "none":
    raise UserError("config.quant.kind needs an adapter: a 4-bit base cannot be fully "
                     "fine-tuned (set config.adapter.kind=lora)")
  lora = prefix = quant = None
  try:  # the dataclasses check their fields; here the fields come from the user's config
    if kind == "lora":
      lora = LoraConfig(rank=a.rank, alpha=a.alpha, dropout=a.dropout, targets=a.targets,
                        rslora=a.rslora, init=a.init, dora=a.dora)
    elif kind in ("prefix", "prompt"):
      prefix = PrefixConfig(kind=kind, length=a.length, reparam=a.reparam,
                            reparam_hidden=a.reparam_hidden)
    if q.kind != "none":
      quant = QuantConfig(kind=q.kind, block_size=q.block_size, double_quant=q.double_quant)
  except ValueError as e:
    raise UserError(f"config.adapter / config.quant: {e}") from None
  return AdapterSpec(lora=lora, quant=quant, prefix=prefix)


def numerics_config(config) -> dict:
  """ModelConfig's adapter_dtype and matmul_precision from `adapter.dtype` and
  `model.matmul_precision` (configs saved before these keys existed get the defaults)."""
  out = dict(adapter_dtype=_get(config.adapter, "dtype", "float32"),
             matmul_precision=_get(config.model, "matmul_precision", "auto"))
  checks = (("adapter.dtype", out["adapter_dtype"], ADAPTER_DTYPES),
            ("model.matmul_precision", out["matmul_precision"], MATMUL_PRECISIONS))
  for key, value, allowed in checks:
    if value not in allowed:
      raise UserError(f"config.{key}={value!r}: expected one of {', '.join(allowed)}")
  return out


def rules(config) -> list:
  """Trainable-parameter rules: the adapter's set, with `adapter.train_extra` regexes first."""
  extra = [(rx, partition.TRAIN) for rx in _get(config.adapter, "train_extra", "").split(",")
           if rx]
  return partition.rules_for("full" if config.adapter.kind == "none" else config.adapter.kind,
                             extra)


def tokenizer_path(config) -> str:
  m = config.model
  path = m.tokenizer or m.hf_path
  if not path:
    raise UserError("config.model.tokenizer is required when no config.model.hf_path is given")
  return hf.resolve(path)


def build_model(config, rng: Optional[jax.Array] = None, par=None):
  """(model, params, tokenizer, base_ref) from the config's model/adapter/quant sections.

  With `model.hf_path` the HF checkpoint is loaded (quantized while streaming, adapters
  initialised beside it); otherwise the `model.preset` shape is initialised from
  `model.seed` with the tokenizer's vocabulary (continued pretraining from scratch).
  base_ref identifies the frozen base for checkpoint restores. With `par` (a pjit
  `sharding.Parallel`), params are built or loaded straight into their shards.
  """
  m = config.model
  spec = adapter_spec(config)
  tok = load_tokenizer(tokenizer_path(config))
  rng = jax.random.PRNGKey(m.seed) if rng is None else rng
  dtype, cdt = m.dtype, m.compute_dtype or m.dtype
  head = _get(m, "head", "lm")
  numerics = numerics_config(config)
  if m.hf_path:
    extra = {"head": head}
    if head == "score" and tok.pad_token_id is not None:
      extra["pad_token_id"] = tok.pad_token_id  # HF classifiers find the last token by it
    if par is not None and par.mode == "pjit":
      extra.update(mesh=par.mesh, rules=par.rules)
    model, params = hf.load_pretrained(
        m.hf_path, dtype=dtype, compute_dtype=cdt, attention=m.attention, remat=m.remat,
        lora=spec.lora, quant=spec.quant, prefix=spec.prefix, rng=rng, **numerics, **extra)
    path = hf.resolve(m.hf_path)
    return model, params, tok, {"kind": "hf", **checkpoint.base_reference(path)}
  cfg = get_preset(m.preset).replace(
      vocab_size=len(tok), param_dtype=dtype, dtype=cdt, attention=m.attention, remat=m.remat,
      head=head, **numerics,
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  model = Decoder(cfg, spec)
  if par is not None and par.mode == "pjit":
    from ftjax import sharding
    params = sharding.sharded_init(model, rng, par.mesh, par.rules)
  else:
    params = init_params(model, rng)
  if spec.quant is not None:
    raise UserError("config.quant needs a pretrained base (config.model.hf_path)")
  return model, params, tok, {"kind": "preset", "preset": m.preset, "seed": m.seed}


def data_config(config, workdir: Optional[str] = None) -> dict:
  """`config.data` as the dataset builders take it: `data.path` / `data.eval_path` (comma
  lists of files) are shortcuts for `data.sources` / `data.eval_sources`; an empty
  `data.cache_dir` is `workdir`/data_cache (no cache without a workdir)."""
  d = config.data.to_dict()
  if not d.get("cache_dir"):
    d["cache_dir"] = os.path.join(workdir, "data_cache") if workdir else ""
  if d.get("path"):
    d["sources"] = [{"path": p} for p in d["path"].split(",") if p]
  if d.get("eval_path"):
    d["eval_sources"] = [{"path": p} for p in d["eval_path"].split(",") if p]
  if "max_prompt_len" in d:  # the preference key's older name (configs saved before the rename)
    legacy = d.pop("max_prompt_len")
    if legacy and not d.get("max_prompt_length"):
      d["max_prompt_length"] = legacy
  if not d.get("sources"):
    raise UserError("config.data.path (or config.data.sources) is required")
  return d


def optimizer(config):
  """(schedule, optax transform) from the `optim` section, over `train.steps` steps."""
  o = config.optim
  schedule = common.make_schedule(o.lr, int(config.train.steps), int(o.warmup_steps), o.schedule,
                                  float(o.min_lr_ratio))
  tx = common.make_optimizer(o.name, schedule, float(o.weight_decay), float(o.clip), float(o.b1),
                             float(o.b2), float(o.eps))
  return schedule, tx


def parallel(config):
  """The run's placement (`config.parallel`: pjit on `config.mesh`, or pmap), after
  `jax.distributed.initialize()` when `config.mesh.distributed` (multi-host)."""
  from ftjax import sharding
  mesh = config.mesh
  if _get(mesh, "distributed", False):
    init_distributed()
  rules = sharding.rules_from_config(dict(_get(mesh, "rules", {}) or {}))
  return sharding.Parallel(_get(config, "parallel", "pjit"), mesh.shape, rules)


_DISTRIBUTED = False


def init_distributed():
  """jax.distributed.initialize() once; on Cloud TPU pods and Slurm it needs no arguments."""
  global _DISTRIBUTED
  if not _DISTRIBUTED:
    jax.distributed.initialize()
    _DISTRIBUTED = True


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
    if _get(_get(config, "mesh", {}), "distributed", False):
      init_distributed()  # the lock needs to know process 0
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
  model, params, tok, base_ref = build_model(config)
  extra_rules = []
  if "ppo" in config:  # PPO trains a value head or critic beside the policy
    from ftjax.train import ppo
    params, extra_rules, _ = ppo.add_critic(config, model, params)
  trainable, frozen, _ = common.split_params(params, extra_rules + rules(config))
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
    _, tx = optimizer(config)
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
    params = {k: v for k, v in params.items() if k not in ppo.HEAD_KEYS}
  return model, params, tok, config
