"""A cache of tokenized examples, so that a resume (or a second run on the same data) does not
tokenize its data again.

One file per dataset build, `<cache_dir>/<kind>-<key>.npz`, where the key hashes everything the
examples depend on: the content of every source file, the tokenizer (its files and its
vocabulary, chat template and special tokens), the data settings (format, fields, overflow,
masks, eval split, ...), seq_len and the seed (which picks the eval hold-out and the mix). A
changed source file therefore gets a new key and is tokenized again; nothing is ever updated in
place. Files are written to a temporary name and renamed, so a killed run leaves either the
whole file or none. Only numpy arrays and JSON text are stored (`np.load(allow_pickle=False)`).

Sources that are not local files (hub datasets, TFDS) are not cached: their content has no
cheap hash here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import zipfile
from typing import Any, Callable, Optional

import numpy as np
from absl import logging

from ftjax.data.formats import DataStats
from ftjax.data.sources import cfg_get

# Bump when the example layout or tokenization code changes meaning (2: a plain-text sequence
# starts with the special tokens tokenizer(text) adds, no longer always with BOS).
CACHE_VERSION = 2
# Tokenizer files in a model or tokenizer directory (the model's weights are not hashed).
_TOKENIZER_FILE = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|"
                             r"vocab\..*|merges\.txt|.*\.model|chat_template\..*)$")
# Data settings that do not change the examples.
_IGNORED_KEYS = ("cache_dir",)


def file_hash(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def tokenizer_hash(tokenizer) -> Optional[str]:
  """A hash of what tokenization depends on, or None when there is nothing to hash."""
  parts = {"class": type(tokenizer).__name__,
           "chat_template": str(getattr(tokenizer, "chat_template", None)),
           "special": {k: str(getattr(tokenizer, k, None)) for k in
                       ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}}
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    parts["backend"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
  d = getattr(tokenizer, "name_or_path", "")
  if d and os.path.isdir(d):
    parts["files"] = {n: file_hash(os.path.join(d, n)) for n in sorted(os.listdir(d))
                      if _TOKENIZER_FILE.match(n) and os.path.isfile(os.path.join(d, n))}
  if "backend" not in parts and not parts.get("files"):
    return None
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _source_path(source: Any) -> Optional[str]:
  if isinstance(source, str):
    return source
  if cfg_get(source, "hub") or cfg_get(source, "tfds"):
    return None
  return cfg_get(source, "path")


def cache_key(data_config: Any, kind: str, tokenizer, seq_len: int, seed: int) -> Optional[str]:
  """The hex key of this build, or None when it cannot be cached (a hub or TFDS source, a
  missing file: the build itself reports that)."""
  d = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
  files = {}
  for source in list(d.get("sources") or []) + list(d.get("eval_sources") or []):
    path = _source_path(source)
    if not path or not os.path.isfile(path):
      return None
    files[os.path.abspath(path)] = file_hash(path)
  tok = tokenizer_hash(tokenizer)
  if tok is None:
    return None
  settings = {k: v for k, v in d.items() if k not in _IGNORED_KEYS}
  blob = json.dumps({"version": CACHE_VERSION, "kind": kind, "seq_len": int(seq_len),
                     "seed": int(seed), "data": settings, "files": files, "tokenizer": tok},
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _pack(prefix: str, examples: list, out: dict) -> bool:
  """Adds `examples` (dicts of 1-D arrays and ints, all with the same keys) to `out` as flat
  arrays; False when they do not have that shape (then nothing is cached)."""
  keys = sorted(examples[0]) if examples else []
  out[f"{prefix}/n"] = np.asarray(len(examples), np.int64)
  out[f"{prefix}/keys"] = np.asarray(json.dumps(keys))
  for k in keys:
    vals = [e.get(k) for e in examples]
    if all(isinstance(v, np.ndarray) and v.ndim == 1 for v in vals):
      out[f"{prefix}/{k}"] = np.concatenate(vals) if vals else np.zeros(0)
      out[f"{prefix}/{k}.offsets"] = np.cumsum([0] + [len(v) for v in vals]).astype(np.int64)
    elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
      out[f"{prefix}/{k}"] = np.asarray(vals, np.int64)
    else:
      return False
  return all(sorted(e) == keys for e in examples)


def _unpack(prefix: str, z) -> list:
  n, keys = int(z[f"{prefix}/n"]), json.loads(str(z[f"{prefix}/keys"]))
  examples = [{} for _ in range(n)]
  for k in keys:
    flat = z[f"{prefix}/{k}"]
    if f"{prefix}/{k}.offsets" in z:
      off = z[f"{prefix}/{k}.offsets"]
      for i in range(n):
        examples[i][k] = flat[off[i]:off[i + 1]]
    else:
      for i in range(n):
        examples[i][k] = int(flat[i])
  return examples


def _write(path: str, arrays: dict):
  """Writes to a temporary name and renames: a kill leaves the whole file or none."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_or_build(cache_dir: Optional[str], data_config: Any, kind: str, tokenizer,
                  seq_len: int, seed: int, build: Callable[[], tuple]) -> tuple:
  """`build()` -> (train_examples, eval_examples, train_stats, eval_stats), read from
  `cache_dir` when an earlier build with the same key stored it there (else built and stored).
  No cache_dir ("" or "none"): just `build()`."""
  cache_dir = None if cache_dir in ("", "none", None) else cache_dir
  key = cache_key(data_config, kind, tokenizer, seq_len, seed) if cache_dir else None
  if key is None:
    return build()
  path = os.path.join(cache_dir, f"{kind}-{key}.npz")
  if os.path.exists(path):
    try:
      with np.load(path, allow_pickle=False) as z:
        stats = [DataStats(**json.loads(str(z[f"{s}/stats"]))) for s in ("train", "eval")]
        out = (_unpack("train", z), _unpack("eval", z), *stats)
      logging.info("tokenized data from the cache %s", path)
      return out
    # Unreadable (cut short by a full disk, say): built again and written over.
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
      logging.warning("data cache %s unreadable (%s); tokenizing again", path, e)
  out = build()
  train, evals, stats, eval_stats = out
  arrays = {"train/stats": np.asarray(json.dumps(dataclasses.asdict(stats))),
            "eval/stats": np.asarray(json.dumps(dataclasses.asdict(eval_stats)))}
  if _pack("train", train, arrays) and _pack("eval", evals, arrays):
    _write(path, arrays)
    logging.info("tokenized data cached in %s", path)
  return out
