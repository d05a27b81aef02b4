"""Orbax checkpoints of the train state, the data position and run facts; NaN guard; SIGTERM flag.

A workdir's checkpoints live in `workdir/checkpoints/<step>/` with three items:

  state/   the train state pytree (trainable params, optimizer state, step, rng key), via
           `ocp.args.StandardSave`, restored into the structure and shardings of a target
  data/    the data iterator position (small JSON dict), `ocp.args.JsonSave`
  extra/   run facts (JSON), e.g. `{"base": base_reference(hf_dir)}` to detect a changed base
  metrics/ written by orbax itself when a save carries `best_metric`

Orbax behaviours this module relies on (checked against orbax-checkpoint 0.12.8, see
tests/test_checkpoint.py):
- A step is written to `<step>.orbax-checkpoint-tmp/` and renamed to `<step>/` only once every
  item is on disk, so a crash mid-save leaves a tmp dir that `all_steps`/`latest_step` never
  report (also after a real SIGKILL mid async save); `cleanup_tmp_directories=True` deletes such
  leftovers in the background when the next run opens the directory, finishing before its first
  save (which could otherwise collide with a leftover of the same step).
- An async save copies device arrays to host before `save` returns, so the caller may donate or
  delete the state right after (the train step's `donate_argnums=0`); the disk write finishes in
  a background thread. A later `save`, `wait()` or `close()` waits for it.
- `StandardRestore` rejects a target whose shape differs from the stored one, but silently casts
  dtypes and reports mismatches without naming the leaf; `restore` therefore checks the target
  against the stored metadata first and names the first offending leaf.

Every process calls `save`/`restore` (orbax coordinates the hosts); `data_state` and `extra` are
written by the primary host only, so they must be the same on every process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import re
import json
import logging
import math
import os
import signal
import struct
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ftjax.errors import UserError


# Errors of the disk under a checkpoint: one line naming it (Checkpointer), not orbax's
# tracebacks from each of its save threads.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_DISK_TEXTS = ("No space left on device", "Disk quota exceeded", "Read-only file system")


def disk_error(e: BaseException | None) -> str | None:
  """The reason ("No space left on device", ...) when `e` or an exception in its chain is a
  full, over-quota or read-only disk; else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
      return e.strerror or os.strerror(e.errno)
    text = str(e)
    for t in _DISK_TEXTS:
      if t in text:
        return t
    e = e.__cause__ or e.__context__
  return None


class _DropNoMetricsWarning(logging.Filter):
  """Orbax warns on every save without metrics once best_fn is set; most of ours are such."""

  def filter(self, record):
    if "did not provide metrics" in record.getMessage():
      return False
    if "orbax" in record.pathname and (
        disk_error(record.exc_info[1] if record.exc_info else None)
        or any(t in record.getMessage() for t in _DISK_TEXTS)):
      return False  # the Checkpointer reports it in one line
    # Orbax narrates every save at INFO (renames, threads, syncs); keep its warnings only.
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


logging.getLogger("absl").addFilter(_DropNoMetricsWarning())


# ------------------------------------------------------------------------------------------------
# NaN / Inf guard


def _path_str(keypath) -> str:
  return ".".join(ocp.tree.str_keypath(keypath)) or "<root>"


@jax.jit
def _finite_flags(leaves):
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def assert_finite(tree: Any, what: str = "state") -> None:
  """Raises FloatingPointError naming the first floating leaf of `tree` holding NaN or Inf.

  One jitted reduction over all floating leaves, so a sharded multi-GB state costs one small
  device-to-host transfer. Integer, bool and PRNG-key leaves are skipped.
  """
  named = []
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      if isinstance(leaf, float):
        named.append((_path_str(kp), np.float32(leaf)))
      continue
    if jnp.issubdtype(dtype, jnp.inexact):
      named.append((_path_str(kp), leaf))
  if not named:
    return
  flags = _finite_flags([x for _, x in named])
  # Multi-host: the flags are replicated, so this process's shard holds all of them.
  flags = np.asarray(flags if flags.is_fully_addressable else flags.addressable_data(0))
  if not flags.all():
    bad = [name for (name, _), ok in zip(named, flags) if not ok]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise FloatingPointError(f"{what} has NaN/Inf at '{bad[0]}'{more}")


# ------------------------------------------------------------------------------------------------
# Base model fingerprint

_SAMPLES = 16          # evenly spaced reads per safetensors data region
_SAMPLE_BYTES = 1 << 20  # 1 MiB each; a data region up to 16 MiB is hashed whole


def base_fingerprint(path: str) -> str:
  """A sha256 hex digest identifying the weights of the HF model directory `path`.

  Hashed, in this order: the bytes of `config.json` (if present); then for each `*.safetensors`
  file in sorted name order: its name, its size in bytes, its JSON header (tensor names, dtypes,
  shapes, offsets), and 16 evenly spaced 1 MiB slices of its data region (the first slice at the
  start, the last ending at the end of file; the whole region when it is 16 MiB or less).
  Modification times are not hashed, so a copy fingerprints the same. Reads at most ~16 MiB per
  file, so it takes well under a second on multi-GB checkpoints. A change to unsampled bytes that
  keeps the size and header is missed; re-quantized or re-trained weights change every slice.
  """
  files = sorted(os.listdir(path))
  st_files = [f for f in files if f.endswith(".safetensors")]
  if not st_files:
    raise UserError(f"{path}: no *.safetensors files to fingerprint")
  h = hashlib.sha256()
  cfg = os.path.join(path, "config.json")
  if os.path.exists(cfg):
    with open(cfg, "rb") as f:
      data = f.read()
    h.update(b"config.json" + struct.pack("<Q", len(data)) + data)
  for name in st_files:
    fname = os.path.join(path, name)
    size = os.path.getsize(fname)
    with open(fname, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise UserError(f"{fname}: truncated safetensors file (no header length)")
      (n,) = struct.unpack("<Q", raw)
      if 8 + n > size:
        raise UserError(f"{fname}: safetensors header length {n} exceeds file size {size}")
      header = f.read(n)
      h.update(name.encode() + struct.pack("<QQ", size, n) + header)
      start, length = 8 + n, size - 8 - n
      if length <= _SAMPLES * _SAMPLE_BYTES:
        offsets = [start]
        span = length
      else:
        stride = (length - _SAMPLE_BYTES) / (_SAMPLES - 1)
        offsets = [start + round(i * stride) for i in range(_SAMPLES)]
        span = _SAMPLE_BYTES
      for off in offsets:
        f.seek(off)
        h.update(f.read(span))
  return h.hexdigest()


def base_reference(path: str) -> dict:
  """`{"path", "fingerprint"}` of a frozen base, to store as `extra["base"]` at save time."""
  return {"path": os.path.abspath(path), "fingerprint": base_fingerprint(path)}


class BaseModelChangedError(UserError):
  """The frozen base under a checkpoint no longer matches the one it was trained on."""


def check_base(extra: dict | None, path: str) -> None:
  """Raises BaseModelChangedError if `path` differs from the base recorded in `extra["base"]`.

  A checkpoint with no recorded base (full fine-tuning, preset models) passes.
  """
  want = ((extra or {}).get("base") or {}).get("fingerprint")
  if want is None:
    return
  got = base_fingerprint(path)
  if got != want:
    was = extra["base"].get("path") or "?"
    raise BaseModelChangedError(
        f"base model at {path} changed since the checkpoint was written (fingerprint {got[:12]} "
        f"!= {want[:12]}, recorded from {was}); restore with the original base or use a new "
        "workdir")


# ------------------------------------------------------------------------------------------------
# Checkpointer


def _to_json(d: dict | None, what: str) -> dict:
  d = {} if d is None else d
  try:
    return json.loads(json.dumps(d))
  except (TypeError, ValueError) as e:
    raise TypeError(f"checkpoint {what} must be JSON-serialisable: {e}") from None


def _stored_shape_dtype(leaf) -> tuple[tuple, Any]:
  """What orbax writes for a target leaf: typed PRNG keys are stored as their key data."""
  dtype = leaf.dtype
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    s = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, dtype))
    return tuple(s.shape), np.dtype(s.dtype)
  return tuple(leaf.shape), np.dtype(dtype)


def _abstract(x):
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x


_HANDLERS_SET = False


def _cpu_array_handler():
  """On CPU, save jax.Arrays without orbax's replica-parallel slicing. A replicated array is
  otherwise cut into one slice per replica with an eager `jax.lax.slice` per device, each a small
  compile of its own: on 8 host devices, 160 compiles (13 s) in one sharded save. CPU devices
  share one host and one disk, so the parallel write buys nothing there; GPU and TPU keep
  orbax's default. Both layouts restore the same way."""
  global _HANDLERS_SET
  if _HANDLERS_SET or jax.default_backend() != "cpu":
    return
  from orbax.checkpoint import type_handlers
  from orbax.checkpoint._src.metadata import array_metadata_store
  from absl import logging as absl_logging
  # As orbax's default jax.Array handler, with its metadata store (PRNG key dtypes live there);
  # orbax's "overriding jax.Array" warning is this, on purpose: not a line for every run's log.
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    type_handlers.register_type_handler(
        jax.Array, type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                              use_replica_parallel=False), override=True)
  finally:
    absl_logging.set_verbosity(verbosity)
  _HANDLERS_SET = True


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run, plus the best one by `best_metric` (lower wins).

  Usage in a loop:

    ckpt = Checkpointer(workdir, keep=config.train.keep)
    if ckpt.latest_step() is not None:
      state, data_state, extra = ckpt.restore(target=jax.eval_shape(init_state))
      check_base(extra, config.model.hf_path)
    ...
    ckpt.save(step, state, data_iter.state(), metrics=eval_metrics,
              extra={"base": base_reference(config.model.hf_path)})
    ...
    ckpt.close()
  """

  def __init__(self, workdir: str, keep: int = 3, keep_best: bool = True,
               best_metric: str = "eval_loss", async_save: bool = True):
    if keep < 1:
      raise UserError(f"Checkpointer keep must be >= 1, got {keep}")
    _cpu_array_handler()
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._failed = False  # a save hit a full disk (reported once)
    self.best_metric = best_metric
    self.keep_best = keep_best
    pp = ocp.checkpoint_managers
    policies = [pp.LatestN(n=keep)]
    best_fn = None
    if keep_best:
      best_fn = self._score
      # BestN keeps the last n after sorting; reverse=True sorts descending, so the lowest stays.
      # Saves without the metric are left to LatestN, hence keep_checkpoints_without_metrics=False.
      policies.append(pp.BestN(get_metric_fn=self._score, reverse=True, n=1,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # best_fn and best_mode only drive `best_step()` and the writing of metrics; which steps
        # survive is decided by `preservation_policy` alone.
        best_fn=best_fn, best_mode="min",
        preservation_policy=pp.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=ocp.JsonCheckpointHandler(),
                           extra=ocp.JsonCheckpointHandler()))

  def _score(self, metrics: dict) -> float:
    v = float(metrics[self.best_metric])
    return math.inf if math.isnan(v) else v

  def save(self, step: int, state: Any, data_state: dict | None = None,
           metrics: dict | None = None, extra: dict | None = None, force: bool = False) -> bool:
    """Checks `state` is finite, then starts an (async) save of step `step`.

    Args:
      step: the train step the state is at (the checkpoint's directory name).
      state: pytree of jax arrays; may be donated as soon as this returns.
      data_state: JSON dict, the data iterator position.
      metrics: scalars; ranks the checkpoint for `keep_best` if it holds `best_metric`.
      extra: JSON dict of run facts, returned by `restore`.
      force: save even if orbax's save policy would skip this step (an existing step still
        raises `StepAlreadyExistsError`).

    Returns:
      Whether a save started: False (nothing written) when `step` is not after the latest
      saved step, e.g. a final save at a step `save_every` already covered.

    Raises:
      FloatingPointError: `state` holds NaN/Inf; nothing is written.
    """
    assert_finite(state, f"train state at step {step}")
    data_state = _to_json(data_state, "data_state")
    extra = _to_json(extra, "extra")
    if metrics is not None:
      metrics = {k: float(np.asarray(jax.device_get(v)).item()) for k, v in metrics.items()}
      if self.best_metric not in metrics:
        metrics = None
    with self._disk_errors(step):
      return self.manager.save(
          int(step),
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  extra=ocp.args.JsonSave(extra)),
          metrics=metrics if self.keep_best else None, force=force)

  def _committed_steps(self) -> list[int]:
    try:
      return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
    except OSError:
      return []

  @contextlib.contextmanager
  def _disk_errors(self, step: int | None = None):
    """A full (or read-only) disk during a save, which orbax may only report at a later save
    or at close: a UserError naming the checkpoint dir and the step kept (orbax writes each
    step to a tmp dir first, so the earlier ones are whole)."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 -- re-raised unless it is the disk
      why = disk_error(e)
      if why is None:
        raise
      self._failed = True
      self._drain()
      m = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(e))
      failed = int(m.group(1)) if m else step
      good = [s for s in self._committed_steps() if s != failed]
      kept = (f"the last good checkpoint, step {good[-1]}, is kept" if good
              else "no earlier checkpoint to keep")
      what = f"step {failed}" if failed is not None else "a checkpoint"
      raise UserError(f"{self.directory}: cannot save {what} ({why}); {kept}; free space and "
                      "rerun the same command to resume") from None

  def _drain(self, timeout: float = 600.0) -> None:
    """Waits out every write of the failed save. Orbax stops waiting at the first item that
    fails, and the others' threads may still be writing into `<step>.orbax-checkpoint-tmp/`:
    a resume in the same process would then race its tmp-dir cleanup against them."""
    ckptr = getattr(self.manager, "_checkpointer", None)
    futures = getattr(getattr(ckptr, "_async_manager", None), "_commit_futures", None) or ()
    deadline = time.monotonic() + timeout
    for f in futures:
      try:
        f.result(timeout=max(0.0, deadline - time.monotonic()))
      except Exception:  # noqa: BLE001,S110 -- the first failure is the one reported
        pass

  def wait(self) -> None:
    """Blocks until pending async saves are on disk (and old checkpoints are pruned)."""
    with self._disk_errors():
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      if not self._failed:
        with self._disk_errors():
          self.manager.wait_until_finished()
    finally:
      try:
        self.manager.close()
      except Exception as e:  # noqa: BLE001
        if not (self._failed and disk_error(e)):
          raise

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def latest_step(self) -> int | None:
    """The newest step, or None.

    Includes a save this process started that is still being written (`restore` waits for it);
    unfinished saves left on disk by a crashed process never count.
    """
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the lowest `best_metric`; None if none carried it or keep_best is off."""
    # Orbax's best_step falls back to the latest step when best_fn is unset; we do not.
    return self.manager.best_step() if self.keep_best else None

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def metrics(self, step: int) -> dict | None:
    """The metrics saved with `step` (only saves that carried `best_metric` store them)."""
    return self.manager.metrics(step)

  def _check_target(self, step: int, target: Any) -> None:
    """Raises ValueError naming the first leaf whose structure, shape or dtype differs on disk."""
    md = self.manager.item_metadata(step)
    tree = getattr(md["state"], "tree", md["state"])
    stored = {_path_str(kp): leaf
              for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    want = {_path_str(kp): leaf
            for kp, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    where = f"checkpoint {self.directory}/{step}"
    missing = [k for k in want if k not in stored]
    if missing:
      raise UserError(f"{where}: target leaf '{missing[0]}' is not in the checkpoint "
                       f"({len(missing)} missing; stored e.g. {sorted(stored)[:3]})")
    unexpected = [k for k in stored if k not in want]
    if unexpected:
      raise UserError(f"{where}: checkpoint leaf '{unexpected[0]}' has no place in the target "
                       f"({len(unexpected)} extra)")
    for name, leaf in want.items():
      if not hasattr(leaf, "dtype"):
        continue
      shape, dtype = _stored_shape_dtype(leaf)
      s = stored[name]
      s_shape, s_dtype = tuple(getattr(s, "shape", ())), getattr(s, "dtype", None)
      if s_shape != shape or (s_dtype is not None and np.dtype(s_dtype) != dtype):
        raise UserError(f"{where}: leaf '{name}' is {s_dtype}{list(s_shape)} on disk but the "
                         f"target wants {dtype}{list(shape)}")

  def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict, dict]:
    """Restores `(state, data_state, extra)` from `step` (default: the latest).

    Args:
      step: which checkpoint; None for `latest_step()`.
      target: pytree of jax arrays or `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape(init)` with
        shardings set) giving the structure, shapes, dtypes and shardings to restore into.
        Leaves without a sharding land on the default device. None restores the raw tree
        (namedtuples become lists); use only for inspection.

    Raises:
      FileNotFoundError: no checkpoint (or not that step).
      ValueError: `target` differs from the checkpoint in structure, shape or dtype.
    """
    self.manager.wait_until_finished()  # a save still in flight is not readable yet
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    elif step not in self.manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                              f"(have {self.all_steps()})")
    if target is not None:
      self._check_target(step, target)
      target = jax.tree.map(_abstract, target)
      state_arg = ocp.args.StandardRestore(target)
    else:
      state_arg = ocp.args.StandardRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=state_arg, data=ocp.args.JsonRestore(), extra=ocp.args.JsonRestore()))
    return out["state"], dict(out["data"] or {}), dict(out["extra"] or {})


  def restore_readable(self, target: Any = None) -> tuple[int, Any, dict, dict, list]:
    """`(step, state, data_state, extra, skipped)` of the newest step that reads whole.

    A step that fails to read (a truncated array file, a deleted metadata file: the error may
    only come from inside TensorStore) is skipped for the next older one; `skipped` lists
    `(step, short reason)` of those, newest first.

    Raises:
      FileNotFoundError: no checkpoint at all.
      UserError: none of them reads (naming each step and why).
    """
    self.manager.wait_until_finished()
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    skipped = []
    for step in steps:
      try:
        with _quiet_background_errors():
          self._check_files(step)
          state, data_state, extra = self.restore(step, target)
      except Exception as e:  # noqa: BLE001 -- any damage; KeyboardInterrupt still stops
        skipped.append((step, short_reason(e)))
        continue
      return step, state, data_state, extra, skipped
    why = "; ".join(f"step {s}: {r}" for s, r in skipped)
    raise UserError(f"{self.directory}: no checkpoint reads whole ({why}); restore them from a "
                    "copy or use a new --workdir")

  def _check_files(self, step: int):
    """FileNotFoundError naming the first metadata file of `step` that is missing (orbax would
    otherwise restore without it, or say something misleading)."""
    d = os.path.join(self.directory, str(step))
    for name in ("state/_METADATA", "data/metadata", "extra/metadata"):
      if not os.path.exists(os.path.join(d, name)):
        raise FileNotFoundError(f"{os.path.join(d, name)} is missing")

  def set_aside(self, steps: list[int]) -> list[str]:
    """Renames damaged step dirs to `<step>.damaged-<UTC time>` (kept for the user, out of
    orbax's sight, so that the resumed run can save those steps again); returns the new paths.
    Process 0 renames; every process then reloads the step list."""
    import datetime
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    moved = []
    for step in steps:
      src = os.path.join(self.directory, str(step))
      dst = f"{src}.damaged-{stamp}"
      if jax.process_index() == 0 and os.path.isdir(src):
        os.replace(src, dst)
      moved.append(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("ftjax_checkpoint_set_aside")
    self.manager.reload()
    return moved


class _MainThreadOnly:
  """A stderr that drops what other threads write: TensorStore's callbacks print tracebacks
  ("Event loop is closed") from its own threads when a failed read ends orbax's event loop
  while other reads are in flight."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, s):
    if threading.current_thread() is threading.main_thread():
      return self.stream.write(s)
    return len(s)

  def __getattr__(self, name):
    return getattr(self.stream, name)


@contextlib.contextmanager
def _quiet_background_errors():
  """Around one restore attempt: a damaged step's read failure is reported once, by the
  caller, not as dozens of tracebacks of the reads abandoned with it."""
  import gc
  import sys
  old_err, old_hook = sys.stderr, sys.unraisablehook
  sys.stderr, sys.unraisablehook = _MainThreadOnly(old_err), lambda unraisable: None
  try:
    yield
  except BaseException:
    # Let the abandoned reads finish and their coroutines be collected while muted. A read still
    # running then (a loaded machine) fails later: asyncio logs it, when its task is collected,
    # as "Task exception was never retrieved" with a traceback. Those reports are dropped for
    # the rest of the process; nothing waits on those reads.
    logging.getLogger("asyncio").addFilter(_drop_unretrieved)
    time.sleep(0.2)
    gc.collect()
    raise
  finally:
    sys.stderr, sys.unraisablehook = old_err, old_hook


def _drop_unretrieved(record: logging.LogRecord) -> bool:
  """A logging filter: False for asyncio's report of a task whose exception no one read."""
  return not str(record.msg).split("\n", 1)[0].endswith("exception was never retrieved")


def short_reason(e: BaseException, limit: int = 160) -> str:
  """`Type: first line of the message`, cut to `limit` characters (TensorStore's errors run
  to many lines)."""
  lines = [ln.strip() for ln in str(e).split(". See full TensorStore")[0].splitlines()
           if ln.strip()]
  text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# Preemption


class PreemptionHandler:
  """Context manager turning SIGTERM and SIGINT (Ctrl-C) into a flag the loop polls, so it can
  save and exit.

    with PreemptionHandler() as preempt:
      for step in ...:
        ...
        if preempt.any_requested():   # every process, every step
          ckpt.save(step, ...); break

  `any_requested()` agrees across processes, so a signal to one host stops every host after
  the same step (a host that stopped alone would leave the others waiting in a collective).
  The previous handlers are restored on exit. Must be entered on the main thread (Python only
  delivers signals there).
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    self.signals = tuple(signals)
    self.requested = False
    self.signum: int | None = None
    self._old: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    self.signum = self.signum or signum

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionHandler must be entered on the main thread")
    for s in self.signals:
      self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old if old is not None else signal.SIG_DFL)
    self._old.clear()

  def any_requested(self) -> bool:
    """True if any process got a signal; a collective, so call it on every process alike.

    A process that learns of another's signal takes that signal's number as its own `signum`,
    so every host reports the same reason.
    """
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    # One int per process: 0 for no signal, else the signal number.
    flags = np.asarray(multihost_utils.process_allgather(
        np.asarray(self.signum if self.requested else 0, np.int32)))
    if not flags.any():
      return False
    self.requested = True
    self.signum = self.signum or int(flags[flags != 0][0])
    return True
