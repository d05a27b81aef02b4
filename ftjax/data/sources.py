"""Where records come from: local files, hub datasets, TFDS; and mixing sources by weight.

A source is a dict (or ConfigDict) with exactly one of:
  path:  a local `.json` (a list of objects, or `{"data": [...]}`), `.jsonl`, `.parquet` or `.csv`
  hub:   a `datasets.load_dataset` name, with `split` (default "train") and optional `config`
  tfds:  a TFDS name, with `split` (default "train") and optional `data_dir`, read through
         `tfds.data_source` (no TensorFlow needed)
plus an optional `limit` (keep the first N records). A bare string is shorthand for `{"path": s}`.

Row numbers in error messages are 1-based: the line number for JSONL, the data row (header
excluded) for CSV, the position in the list for JSON, parquet, hub and TFDS.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Sequence

import numpy as np

from ftjax.errors import UserError


MIX_STREAM = 0x6D6978  # keeps mix's random streams apart from the epoch shuffles


class DataError(UserError):
  """Bad input data or data config; the message is one line naming the file, row and field."""


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
  """`cfg[key]` for a dict or an ml_collections ConfigDict, `default` when absent or None."""
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None else value


class Records(Sequence):
  """A named sequence of records (dicts) that remembers each record's row number.

  `data` may be lazy (a `datasets.Dataset`, a TFDS data source): records are converted to plain
  Python (str, int, float, list, dict) when read.
  """

  def __init__(self, name: str, data: Sequence, rows: Sequence[int] | None = None):
    self.name = name
    self._data = data
    self._rows = rows

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, i):
    if isinstance(i, slice):
      idx = range(len(self))[i]
      return [self[j] for j in idx]
    return to_python(self._data[i])

  def row(self, i: int) -> int:
    """The 1-based row number of record i, as error messages name it."""
    return self._rows[i] if self._rows is not None else i + 1

  def where(self, i: int) -> str:
    return f"{self.name}: row {self.row(i)}"

  def take(self, indices: Sequence[int]) -> Records:
    """The records at `indices`, keeping their row numbers."""
    return Records(self.name, _Take(self._data, indices), [self.row(i) for i in indices])


def to_python(x: Any) -> Any:
  """Plain Python from numpy / TFDS values: bytes -> str, arrays -> lists, scalars -> items."""
  if isinstance(x, dict):
    return {k: to_python(v) for k, v in x.items()}
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray):
    return to_python(x.tolist()) if x.ndim else to_python(x.item())
  if isinstance(x, np.generic):
    return to_python(x.item())
  if isinstance(x, (list, tuple)):
    return [to_python(v) for v in x]
  return x


def load_records(source: Any) -> Records:
  """Read one source (see the module docstring) into `Records`."""
  if isinstance(source, str):
    source = {"path": source}
  kinds = [k for k in ("path", "hub", "tfds") if cfg_get(source, k)]
  if len(kinds) != 1:
    raise DataError(f"data source {dict(source)!r}: give exactly one of 'path', 'hub', 'tfds'")
  kind = kinds[0]
  if kind == "path":
    records = _load_file(str(cfg_get(source, "path")))
  elif kind == "hub":
    records = _load_hub(cfg_get(source, "hub"), cfg_get(source, "split", "train"),
                        cfg_get(source, "config"))
  else:
    records = _load_tfds(cfg_get(source, "tfds"), cfg_get(source, "split", "train"),
                         cfg_get(source, "data_dir"))
  limit = cfg_get(source, "limit")
  if limit is not None and limit < len(records):
    records = records.take(range(int(limit)))
  return records


class _Take(Sequence):
  """data[indices[i]] for each i, without copying data."""

  def __init__(self, data: Sequence, indices: Sequence[int]):
    self._data, self._indices = data, [int(i) for i in indices]

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, i):
    return self._data[self._indices[i]]


def _load_file(path: str) -> Records:
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".jsonl":
    return _load_jsonl(path)
  if ext == ".json":
    with open(path, encoding="utf-8") as f:
      try:
        obj = json.load(f)
      except json.JSONDecodeError as e:
        msg = f"{path}: line {e.lineno}: invalid JSON ({e.msg}, column {e.colno})"
        raise DataError(msg) from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
      obj = obj["data"]
    if not isinstance(obj, list):
      raise DataError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}")
    return Records(path, obj)
  if ext == ".parquet":
    import pyarrow.parquet as pq
    return Records(path, pq.read_table(path).to_pylist())
  if ext == ".csv":
    with open(path, encoding="utf-8", newline="") as f:
      return Records(path, list(csv.DictReader(f)))
  raise DataError(f"{path}: unknown file type {ext!r} (use .json, .jsonl, .parquet or .csv)")


def _load_jsonl(path: str) -> Records:
  data, rows = [], []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        data.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise DataError(f"{path}: row {lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
      rows.append(lineno)
  return Records(path, data, rows)


def _load_hub(name: str, split: str, config: str | None) -> Records:
  try:
    import datasets
    ds = datasets.load_dataset(name, config, split=split)
  except Exception as e:  # any failure becomes one clear line
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise DataError(f"hub dataset '{name}' (split '{split}'): could not load: "
                    f"{type(e).__name__}: {first} (offline? download it and use 'path')") from None
  return Records(f"hub:{name}[{split}]", ds)


def _load_tfds(name: str, split: str, data_dir: str | None) -> Records:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(f"tfds dataset '{name}': tensorflow-datasets is not installed "
                    "(pip install tensorflow-datasets)") from None
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise DataError(f"tfds dataset '{name}' (split '{split}'): could not load: "
                    f"{type(e).__name__}: {first}") from None
  return Records(f"tfds:{name}[{split}]", ds)


def mix_counts(sizes: Sequence[int], weights: Sequence[float], total: int | None = None):
  """How many items each source contributes to one mixed epoch.

  The rule: an epoch has `total` items (default: sum of sizes); source i contributes a share
  proportional to weights[i], rounded by largest remainder so the counts sum to `total`.
  """
  sizes = [int(s) for s in sizes]
  w = np.asarray(weights, np.float64)
  if len(w) != len(sizes) or (w < 0).any() or w.sum() <= 0:
    raise DataError(f"mix weights must be >= 0 with a positive sum, one per source: {list(w)}")
  for s, wi in zip(sizes, w):
    if s == 0 and wi > 0:
      raise DataError("a data source with a positive weight has no examples")
  total = sum(sizes) if total is None else int(total)
  exact = total * w / w.sum()
  counts = np.floor(exact).astype(np.int64)
  # Largest remainders first; ties go to the earlier source, so the rule is deterministic.
  order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
  for i in order[:total - int(counts.sum())]:
    counts[i] += 1
  return [int(c) for c in counts]


def mix(sources_with_weights: Sequence[tuple[Sequence, float]], seed: int,
        total: int | None = None) -> list:
  """Mix several lists of items by weight into one list, deterministically in `seed`.

  Source i contributes `mix_counts(...)[i]` items: whole passes over it (upsampling), then the
  first items of a seeded permutation of it for the remainder (subsampling). The result is
  concatenated in source order; the training iterator shuffles it every epoch. The mix is fixed
  once: every epoch sees the same items.
  """
  items = [list(s) for s, _ in sources_with_weights]
  counts = mix_counts([len(s) for s in items], [w for _, w in sources_with_weights], total)
  out = []
  for i, (src, count) in enumerate(zip(items, counts)):
    if count == 0:
      continue
    full, rest = divmod(count, len(src))
    out.extend(src * full)
    perm = np.random.default_rng([seed, MIX_STREAM, i]).permutation(len(src))[:rest]
    out.extend(src[j] for j in np.sort(perm))
  return out


EVAL_STREAM = 0x6576616C  # keeps the eval hold-out's random stream apart from the others


def describe(source: Any) -> str:
  """A source's name for messages: its path, hub name or TFDS name."""
  if isinstance(source, str):
    return source
  for k in ("path", "hub", "tfds"):
    if cfg_get(source, k):
      return str(cfg_get(source, k))
  return repr(source)


def hold_out(records: Records, fraction: float, seed: int, i: int) -> tuple[Records, Records]:
  """(held-out, kept) records of source i: `fraction` of them, chosen by (seed, i)."""
  n_eval = min(len(records) - 1, max(1, round(fraction * len(records))))
  perm = np.random.default_rng([seed, EVAL_STREAM, i]).permutation(len(records))
  return (records.take(sorted(int(j) for j in perm[:n_eval])),
          records.take(sorted(int(j) for j in perm[n_eval:])))
