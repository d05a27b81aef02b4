"""Run metrics: a JSON-lines log and TensorBoard scalars, a tqdm progress bar, tokens/s and MFU.

`workdir/metrics.jsonl` holds one JSON object per `MetricsWriter.write` call:
`{"step": int, "time": unix seconds, "<name>": float, ...}` (NaN/Inf are written as the
non-standard tokens NaN/Infinity, which `json.loads` reads). TensorBoard events go to
`workdir/tensorboard/` through `tensorboardX` (protobuf + numpy only; no TensorFlow).
Only process 0 writes.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import tqdm

from ftjax.errors import UserError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Fetches device values in one transfer and turns each into a Python float."""
  host = jax.device_get(dict(metrics))
  out = {}
  for k, v in host.items():
    a = np.asarray(v)
    if a.size != 1:
      raise ValueError(f"metric '{k}' must be a scalar, got shape {a.shape}")
    out[k] = float(a.reshape(()))
  return out


class MetricsWriter:
  """Appends metrics to `workdir/metrics.jsonl` and TensorBoard; a no-op off process 0.

  Args:
    workdir: run directory.
    use_tensorboard: also write TensorBoard scalars (needs `tensorboardX`; without it a
      warning is logged and only the JSON lines are written).
    resume_step: when resuming from a checkpoint at this step, drop logged lines with a larger
      step (written by the killed run after its last checkpoint) and tell TensorBoard to purge
      events past it, so the replayed steps are not logged twice.
  """

  def __init__(self, workdir: str, use_tensorboard: bool = True, resume_step: int | None = None):
    self.workdir = workdir
    self.active = jax.process_index() == 0
    self._file = None
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    if resume_step is not None and os.path.exists(path):
      keep = [r for r in read_metrics(workdir) if r.get("step", -1) <= resume_step]
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
      os.replace(tmp, path)
    self._file = open(path, "a", buffering=1)  # line-buffered: a killed run loses <= 1 line
    if use_tensorboard:
      try:
        SummaryWriter = _import_tensorboardx().SummaryWriter
      except ImportError:
        log.warning("tensorboardX is not installed; writing %s only", METRICS_FILE)
      else:
        purge = None
        if resume_step is not None:
          # purge_step only hides the old events in readers that honour it (TensorBoard's
          # Python loader); dropping them from the files hides them from every reader.
          drop_tensorboard_steps_after(os.path.join(workdir, TB_DIR), resume_step)
          purge = resume_step + 1
        # The default file name has one-second resolution: a resume within the same second
        # would reopen (and truncate) the previous run's file.
        self._tb = SummaryWriter(os.path.join(workdir, TB_DIR), purge_step=purge, flush_secs=30,
                                 filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs scalar `metrics` (jax/numpy/Python numbers) at `step`."""
    if not self.active:
      return
    vals = _scalars(metrics)
    now = time.time()
    self._file.write(json.dumps({"step": int(step), "time": now, **vals}) + "\n")
    if self._tb is not None:
      for k, v in vals.items():
        self._tb.add_scalar(k, v, global_step=int(step), walltime=now)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(workdir: str) -> list[dict]:
  """All records of `workdir/metrics.jsonl` in order. A torn last line (what a killed run or a
  full disk leaves) is skipped with a warning; a bad line before it is a UserError naming the
  file and line. The one reader of the file: training's resume and report.py use it."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  out = []
  with open(path, errors="replace") as f:
    lines = f.read().splitlines()
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      problem = None if isinstance(record, dict) else "not a JSON object"
    except json.JSONDecodeError as e:
      problem = f"not JSON ({e.msg})"
    if problem is None:
      out.append(record)
    elif i == last:
      log.warning("%s: line %d is torn (a killed run); skipped", path, i + 1)
    else:
      raise UserError(f"{path}: line {i + 1}: {problem}")
  return out


def _import_tensorboardx():
  """tensorboardX, imported without torch when torch is not loaded yet.

  tensorboardX's writer does `try: import torch` only to name a type in its hints; that import
  is ~1.2 s of every run's start on a CPU, and ftjax writes numpy scalars. Marking torch absent
  for the duration of the import makes tensorboardX take its numpy-only branch; the mark is
  removed at once, so a later `import torch` (the user's, or transformers') works as usual."""
  import sys
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    import tensorboardX
    return tensorboardX
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    import tensorboardX
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return tensorboardX


def drop_tensorboard_steps_after(tb_dir: str, step: int) -> None:
  """Rewrite the event files of `tb_dir` without the summaries of steps > `step`.

  Event files are TFRecords (u64 length, u32 masked crc, data, u32 masked crc); a torn last
  record (a killed run) is dropped too.
  """
  import struct

  _import_tensorboardx()
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  if not os.path.isdir(tb_dir):
    return
  for name in sorted(os.listdir(tb_dir)):
    path = os.path.join(tb_dir, name)
    if "tfevents" not in name or not os.path.isfile(path):
      continue
    with open(path, "rb") as f:
      data = f.read()
    kept, i, changed = [], 0, False
    while i + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      if i + 12 + n + 4 > len(data):
        break
      record = data[i + 12:i + 12 + n]
      i += 12 + n + 4
      event = event_pb2.Event.FromString(record)
      if event.HasField("summary") and event.step > step:
        changed = True
        continue
      kept.append(record)
    if not changed and i == len(data):
      continue
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      for record in kept:
        header = struct.pack("<Q", len(record))
        f.write(header + struct.pack("<I", masked_crc32c(header)) + record
                + struct.pack("<I", masked_crc32c(record)))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Throughput and MFU

# Dense bf16 peak FLOP/s per device (no sparsity), matched as lower-case substrings of
# `device_kind`, first match wins. GPUs are the SXM parts.
PEAK_FLOPS = (
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e reports "TPU v5 lite"
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),       # v5p reports "TPU v5"
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
)


def peak_flops(device_kind: str | None = None) -> float | None:
  """Peak dense bf16 FLOP/s of one device of `device_kind` (default: `jax.devices()[0]`).

  None for CPUs and unknown devices.
  """
  if device_kind is None:
    device_kind = jax.devices()[0].device_kind
  kind = device_kind.lower()
  for key, flops in PEAK_FLOPS:
    if key in kind:
      return flops
  return None


def train_flops_per_token(cfg: Any, seq_len: int, trainable: Any, frozen: Any = None) -> float:
  """Forward+backward FLOPs per token of a train step: 6N for trained weights, 4N for frozen.

  Each matmul weight costs 2 FLOPs per token forward and 2 backward for the activation
  gradient (the layers below need it whether or not the weight trains); only a trained weight
  adds 2 more for its own gradient. So a frozen base under LoRA counts 4N plus 6N for the LoRA
  factors, full fine-tuning 6N as in `cfg.flops_per_token`. The input embedding lookup is no
  matmul; attention scores and values count 3 x forward, as in `cfg.flops_per_token`.

  Args:
    cfg: the ModelConfig of the base.
    seq_len: tokens per row (for the attention FLOPs).
    trainable: the trained params tree (arrays or shape structs); frozen: the rest (only its
      LoRA factors are read: frozen adapters still run forward and backward).
  """
  from flax import traverse_util
  head = cfg.vocab_size * cfg.d_model if cfg.head == "lm" else 0  # score: in num_params
  n_base = cfg.num_params(include_embeddings=False) + head
  size = lambda x: int(np.prod(np.shape(x)))
  trained_base = trained_lora = frozen_lora = 0
  for key, leaf in traverse_util.flatten_dict(dict(trainable or {})).items():
    if key[-1] in ("lora_a", "lora_b", "lora_magnitude") or any(
        k in ("attn_adapter", "mlp_adapter") for k in key):
      trained_lora += size(leaf)
    elif key[0] == "embed":
      trained_base += head if cfg.tie_embeddings else 0  # tied: also the output matmul
    elif key[0] not in ("pos_embed", "prefix", "prompt"):
      trained_base += size(leaf)
  for key, leaf in traverse_util.flatten_dict(dict(frozen or {})).items():
    if key[-1] in ("lora_a", "lora_b"):
      frozen_lora += size(leaf)
  attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
  return 4.0 * (n_base + frozen_lora) + 2.0 * trained_base + 6.0 * trained_lora + attn


class Throughput:
  """Tokens/s over a sliding window of steps, and model FLOPs utilisation (MFU).

  Call `update(tokens)` once per step with the tokens processed by all processes in that step
  (global batch, e.g. `batch_size * seq_len` or the count of non-pad tokens). Call it after the
  step's outputs are on the host (e.g. after fetching the loss); otherwise JAX's async dispatch
  makes it time the dispatch, not the work. The first call only starts the clock, which keeps
  compilation out of the rate.

  MFU = tokens/s * flops_per_token / (peak FLOP/s per device * number of devices), with
  `flops_per_token` from `cfg.flops_per_token(seq_len)` (6N plus attention: every weight
  trained) unless given; with frozen weights pass `train_flops_per_token(...)`. Omitted when
  the device's peak is unknown (CPU) or no FLOP count was given.
  """

  def __init__(self, cfg: Any = None, seq_len: int | None = None, *,
               flops_per_token: float | None = None, window: int = 20,
               peak_flops_per_device: float | None = None, num_devices: int | None = None,
               clock: Callable[[], float] = time.perf_counter):
    if flops_per_token is None and cfg is not None:
      if seq_len is None:
        raise ValueError("Throughput(cfg=...) needs seq_len for the attention FLOPs")
      flops_per_token = cfg.flops_per_token(seq_len)
    self.flops_per_token = flops_per_token
    if peak_flops_per_device is None:
      peak_flops_per_device = peak_flops()
    n = jax.device_count() if num_devices is None else num_devices
    self.peak = None if peak_flops_per_device is None else peak_flops_per_device * n
    self.clock = clock
    self._hist: collections.deque = collections.deque(maxlen=window + 1)
    self._tokens = 0

  def update(self, tokens: int) -> dict[str, float]:
    """Records a finished step of `tokens`; returns `stats()` (empty on the first call)."""
    now = self.clock()
    if self._hist:
      self._tokens += int(tokens)
    self._hist.append((now, self._tokens))
    return self.stats()

  def stats(self) -> dict[str, float]:
    """`{"tokens_per_sec": ..., "mfu": ...}` over the window; "mfu" only with a known peak."""
    if len(self._hist) < 2:
      return {}
    (t0, n0), (t1, n1) = self._hist[0], self._hist[-1]
    if t1 <= t0:
      return {}
    tps = (n1 - n0) / (t1 - t0)
    out = {"tokens_per_sec": tps}
    if self.peak and self.flops_per_token:
      out["mfu"] = tps * self.flops_per_token / self.peak
    return out


# ------------------------------------------------------------------------------------------------
# Progress bar


def _si(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}"


class ProgressBar:
  """A tqdm bar over train steps (ETA from tqdm) whose postfix shows loss, lr, tokens/s, MFU
(and reward, KL for online RL).

  Only process 0 draws it. `update(step, metrics)` moves the bar to `step`; it reads the keys
  `loss`, `lr` (or `learning_rate`), `tokens_per_sec`, `mfu`, `reward` and `kl` when present.
  """

  def __init__(self, total_steps: int, initial: int = 0, **tqdm_kwargs):
    self.bar = tqdm.tqdm(total=total_steps, initial=initial, dynamic_ncols=True, unit="step",
                         disable=jax.process_index() != 0, **tqdm_kwargs)

  def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
    if metrics:
      vals = _scalars({k: v for k, v in metrics.items()
                       if k in ("loss", "lr", "learning_rate", "tokens_per_sec", "mfu",
                                "reward", "kl")})
      post = {}
      if "loss" in vals:
        post["loss"] = f"{vals['loss']:.4g}"
      for k in ("reward", "kl"):  # online RL's two numbers to watch
        if k in vals and math.isfinite(vals[k]):
          post[k] = f"{vals[k]:.4g}"
      lr = vals.get("lr", vals.get("learning_rate"))
      if lr is not None:
        post["lr"] = f"{lr:.2e}"
      if "tokens_per_sec" in vals and math.isfinite(vals["tokens_per_sec"]):
        post["tok/s"] = _si(vals["tokens_per_sec"])
      if "mfu" in vals:
        post["mfu"] = f"{100 * vals['mfu']:.1f}%"
      self.bar.set_postfix(post, refresh=False)
    if step > self.bar.n:
      self.bar.update(step - self.bar.n)
    else:
      self.bar.refresh()

  def close(self) -> None:
    self.bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
