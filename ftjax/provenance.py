"""Where a run came from (run.json) and whether a resume may change its config (drift).

`run.json` in a workdir holds `{"runs": [attempt, ...]}`, one attempt per start of the
experiment on that workdir (the first run, then every resume), each with

  start_time   UTC, ISO 8601
  argv, cwd, hostname
  git          {"commit", "dirty"} of the ftjax source tree (None outside a git checkout);
               dirty counts modified tracked files only
  versions     ftjax, python and the key libraries (jax, jaxlib, flax, optax, orbax, ...)
  jax          backend, device kinds and counts, process index and count
  resumed      whether the workdir already held a checkpoint
  config_diff  {key: [saved, new]} against the saved config (allowed keys, or all of them
               with allow_drift)
  config       this attempt's resolved config
  data_hashes  {absolute path: sha256} of the local data files the config names
  data_stats   {"train": DataStats, "eval": DataStats} as dicts (examples, tokens, truncated,
               ...) of the data this attempt read, added once the data is built (the model
               card's data section reads it)

so that with `--config.allow_drift=True` both the old and the new config are on record.

A resume whose config differs from the saved one outside `ALLOWED_DRIFT` (steps, the log,
eval and save cadence, train.offload) is refused with the differing keys named, before anything
is read or written: a changed learning rate or dataset would silently make the checkpoint mean
something else. So is a data file whose content changed since the last attempt (its hash in
run.json): the data position in the checkpoint would point into other rows.
`--config.allow_drift=True` resumes anyway. A workdir without a checkpoint has nothing to
resume: a new config starts it afresh.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from typing import Any

from ftjax.errors import UserError

# Keys a resume may change: how long to train and how often to log, evaluate and save.
ALLOWED_DRIFT = ("train.steps", "train.log_every", "train.eval_every", "train.save_every",
                 "train.eval_batches", "train.keep", "train.async_save", "data.cache_dir",
                 "allow_drift",
                 # Placement only: the same arithmetic in another memory (tests/test_offload.py).
                 "train.offload")
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections",
             "transformers", "tokenizers", "safetensors", "datasets")
_MISSING = "<missing>"
# Config keys added after workdirs were saved without them, with the value their absence meant
# (what the code did before the key existed). A saved config that lacks one of these resumes
# when the new config holds that value: the run is the same run. Add a key here whenever a
# config file gains one that changes nothing at its default.
ADDED_KEYS = {
    "dpo.loss_weights": "", "dpo.ld_alpha": None, "dpo.f_divergence_type": "reverse_kl",
    "dpo.f_alpha_divergence_coef": 0.5, "dpo.discopop_tau": 0.05,
    "adapter.reduction_factor": 16, "adapter.placement": "houlsby",  # read by bottleneck only
    "train.offload": "none",
}


def flatten(d: Any, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}; empty dicts and lists stay leaves."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_dict(config) -> dict:
  """The config as the JSON config.json holds (tuples become lists, as on reading it back)."""
  if isinstance(config, dict):
    return json.loads(json.dumps(config, default=str))
  return json.loads(config.to_json_best_effort())


def config_diff(saved: dict, new: dict) -> dict:
  """{dotted key: [saved value, new value]} of the leaves that differ (or exist on one side)."""
  a, b = flatten(saved), flatten(new)
  return {k: [a.get(k, _MISSING), b.get(k, _MISSING)] for k in sorted(set(a) | set(b))
          if a.get(k, _MISSING) != b.get(k, _MISSING)}


def _short(v: Any) -> str:
  s = json.dumps(v, default=str)
  return s if len(s) <= 40 else s[:37] + "..."


def _has_checkpoint(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def data_files(config) -> list:
  """The local files among `config.data`'s path, eval_path, sources and eval_sources (hub and
  TFDS sources have no file to hash)."""
  data = config_dict(config).get("data") or {}
  paths = []
  for key in ("path", "eval_path"):
    paths += [p for p in str(data.get(key) or "").split(",") if p]
  for key in ("sources", "eval_sources"):
    for src in data.get(key) or []:
      if isinstance(src, str):
        paths.append(src)
      elif isinstance(src, dict) and not (src.get("hub") or src.get("tfds")) and src.get("path"):
        paths.append(src["path"])
  return sorted({os.path.abspath(p) for p in paths if os.path.isfile(p)})


_HASHES: dict = {}


def data_hashes(config) -> dict:
  """{absolute path: sha256 of its content} of `data_files(config)` (memoised on size and
  mtime: the data cache hashes the same files)."""
  from ftjax.data.cache import file_hash
  out = {}
  for path in data_files(config):
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
      _HASHES[key] = file_hash(path)
    out[path] = _HASHES[key]
  return out


def _recorded_hashes(workdir: str) -> dict:
  """The data hashes of the last attempt in run.json that recorded them ({} if none did)."""
  try:
    with open(os.path.join(workdir, "run.json")) as f:
      runs = json.load(f).get("runs", [])
  except (OSError, ValueError, AttributeError):
    return {}
  for attempt in reversed(runs):
    if isinstance(attempt, dict) and isinstance(attempt.get("data_hashes"), dict):
      return attempt["data_hashes"]
  return {}


def check_resume(config, workdir: str) -> dict:
  """The config's diff against the workdir's saved config ({} for a new workdir, or one with
  no checkpoint yet). A key outside ALLOWED_DRIFT that differs, or a data file whose content
  changed (`data:<path>` in the diff), is a UserError naming it, unless `allow_drift`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path) or not _has_checkpoint(workdir):
    return {}
  with open(path) as f:
    try:
      saved = json.load(f)
    except ValueError as e:
      raise UserError(f"{path}: unreadable saved config ({e})") from None
  new = config_dict(config)
  diff = {k: v for k, v in config_diff(saved, new).items()
          if not (v[0] == _MISSING and k in ADDED_KEYS and v[1] == ADDED_KEYS[k])}
  drift = [k for k in diff if k not in ALLOWED_DRIFT]
  if drift and not new.get("allow_drift", False):
    shown = "; ".join(f"{k}: {_short(diff[k][0])} -> {_short(diff[k][1])}" for k in drift[:4])
    more = f" (and {len(drift) - 4} more)" if len(drift) > 4 else ""
    raise UserError(f"{workdir}: the config differs from the saved {path} in {shown}{more}; "
                    "resume with the saved values, use a new --workdir, or pass "
                    "--config.allow_drift=True")
  old = _recorded_hashes(workdir)
  for name, digest in data_hashes(config).items():
    if name in old and old[name] != digest:
      if not new.get("allow_drift", False):
        raise UserError(f"{name}: the data file changed since the run was saved in {workdir} "
                        f"(sha256 {digest[:12]} != {str(old[name])[:12]}); the checkpoint's "
                        "data position would point into other rows. Restore the file, use a "
                        "new --workdir, or pass --config.allow_drift=True")
      diff[f"data:{name}"] = [old[name], digest]
  return diff


def _git(root: str) -> dict:
  def git(*args):
    return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                          timeout=20, check=True).stdout.strip()
  try:
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}
  return {"commit": commit, "dirty": dirty}


def _version(name: str):
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def environment() -> dict:
  """git, versions and jax devices of this process."""
  import jax

  import ftjax
  root = os.path.dirname(os.path.dirname(os.path.abspath(ftjax.__file__)))
  devices = jax.devices()
  kinds = {}
  for d in devices:
    kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
  return {
      "git": _git(root),
      "versions": {"ftjax": ftjax.__version__, "python": platform.python_version(),
                   **{n: _version(n) for n in LIBRARIES}},
      "jax": {"backend": jax.default_backend(), "device_kinds": kinds,
              "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
              "process_index": jax.process_index(), "process_count": jax.process_count()},
  }


def record_run(config, workdir: str, diff: dict, resumed: bool):
  """Appends this attempt to `workdir`/run.json (process 0 only; written atomically)."""
  import jax
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "run.json")
  runs = []
  if os.path.exists(path):
    with open(path) as f:
      try:
        runs = json.load(f).get("runs", [])
      except ValueError:  # not ours to fix; keep the evidence beside the new record
        os.replace(path, path + ".unreadable")
  attempt = {"start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
             "argv": list(sys.argv), "cwd": os.getcwd(), "hostname": socket.gethostname(),
             **environment(), "resumed": resumed, "config_diff": diff,
             "config": config_dict(config), "data_hashes": data_hashes(config)}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"runs": runs + [attempt]}, f, indent=2, default=str)
  os.replace(tmp, path)


def record_data_stats(workdir: str, data):
  """Adds `data.stats` and `data.eval_stats` (a built dataset's counts) to this attempt's entry,
  the last one in `workdir`/run.json (process 0; written atomically). Datasets without stats
  (online RL's prompts) add nothing."""
  import jax
  stats = getattr(data, "stats", None)
  path = os.path.join(workdir, "run.json")
  if jax.process_index() != 0 or not hasattr(stats, "as_dict") or not os.path.exists(path):
    return
  with open(path) as f:
    try:
      record = json.load(f)
    except ValueError:
      return
  runs = record.get("runs") if isinstance(record, dict) else None
  if not runs or not isinstance(runs[-1], dict):
    return
  evals = getattr(data, "eval_stats", None)
  runs[-1]["data_stats"] = {"train": stats.as_dict(),
                            "eval": evals.as_dict() if hasattr(evals, "as_dict") else None}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2, default=str)
  os.replace(tmp, path)
