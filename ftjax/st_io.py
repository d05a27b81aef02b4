"""Safetensors read/write on numpy memory maps, with bfloat16 via ml_dtypes.

The `safetensors` numpy backend has no bfloat16, and its torch backend would pull torch into
the load path; the format is simple enough (8-byte header length, JSON header, raw bytes) to
read tensor by tensor from a memory map, which is what streaming needs anyway.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from ftjax.errors import UserError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsError(UserError):
  pass


class SafetensorsFile:
  """Lazy reader: `names()`, `shape(name)`, `get(name)` -> numpy array (a copy)."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > os.path.getsize(path):
          raise SafetensorsError(f"{path}: corrupt safetensors header (length {n})")
        self.header = json.loads(f.read(n))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise SafetensorsError(f"{path}: not a safetensors file ({e})") from None
    self.metadata = self.header.pop("__metadata__", None) or {}
    self._data_start = 8 + n
    self._mmap = None

  def names(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    info = self.header[name]
    if info["dtype"] not in _DTYPES:
      raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    start, end = info["data_offsets"]
    raw = self._mmap[self._data_start + start:self._data_start + end]
    dtype = np.dtype(_DTYPES[info["dtype"]])
    shape = tuple(info["shape"])
    if raw.size != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise SafetensorsError(f"{self.path}: tensor {name!r} byte size does not match its shape "
                             f"{shape} and dtype {info['dtype']}")
    return np.array(raw.view(dtype).reshape(shape))


def write(path: str, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict | None = None):
  """Write (name, array) pairs to one safetensors file."""
  tensors = [(k, np.ascontiguousarray(v)) for k, v in tensors]
  header, offset = {}, 0
  for name, arr in tensors:
    if arr.dtype not in _NAMES:
      raise SafetensorsError(f"{path}: cannot store tensor {name!r} of dtype {arr.dtype}")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  header["__metadata__"] = {"format": "pt", **(metadata or {})}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, arr in tensors:
      f.write(arr.tobytes())


def write_sharded(out_dir: str, tensors: Iterator[tuple[str, np.ndarray]],
                  max_shard_bytes: int, prefix: str = "model") -> list[str]:
  """Write tensors as `prefix.safetensors`, or shards plus `prefix.safetensors.index.json`.

  Tensors are consumed one by one; at most one shard is held in host memory.
  """
  paths, weight_map, total, files = [], {}, 0, []
  pending: list[tuple[str, np.ndarray]] = []
  pending_bytes = 0

  def flush():
    nonlocal pending, pending_bytes
    if not pending:
      return
    fname = f"{prefix}-{len(files) + 1:05d}.safetensors.part"
    write(os.path.join(out_dir, fname), pending)
    files.append(fname)
    for n, _ in pending:
      weight_map[n] = fname
    pending, pending_bytes = [], 0

  for name, arr in tensors:
    if pending and pending_bytes + arr.nbytes > max_shard_bytes:
      flush()
    pending.append((name, arr))
    pending_bytes += arr.nbytes
    total += arr.nbytes
  flush()
  if len(files) == 1:
    final = f"{prefix}.safetensors"
    os.replace(os.path.join(out_dir, files[0]), os.path.join(out_dir, final))
    return [final]
  n = len(files)
  renamed = {}
  for i, fname in enumerate(files):
    final = f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
    os.replace(os.path.join(out_dir, fname), os.path.join(out_dir, final))
    renamed[fname] = final
    paths.append(final)
  index = {"metadata": {"total_size": total},
           "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
  with open(os.path.join(out_dir, f"{prefix}.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)
  return paths + [f"{prefix}.safetensors.index.json"]
