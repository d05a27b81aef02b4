"""4-bit blockwise quantization of frozen kernels for QLoRA: NF4 (with double quant) and int4.

Pure functions on plain dicts of arrays, so a quantized kernel can sit in a flax params tree in
place of its float kernel:

  cfg = QuantConfig("nf4", block_size=64, double_quant=True)
  q = quantize(kernel, cfg)                                   # [in, out] -> dict of arrays
  w = dequantize(q, cfg, kernel.shape, jnp.bfloat16)          # [in, out], jittable
  y = quantized_matmul(x, q, cfg, kernel.shape, jnp.bfloat16) # [..., in] -> [..., out]

Layout. The kernel (any shape; ftjax kernels are [in, out]) is flattened in C order and cut into
consecutive blocks of `block_size` values, so for an [in, out] kernel with out % block_size == 0
each block is a run of `block_size` output columns within one input row. bitsandbytes flattens the
torch weight [out, in] the same way, i.e. its blocks run along `in`: the codes agree bit for bit
with `bitsandbytes.functional.quantize_4bit` when both get the same array, and differ in blocking
(not in format) when we get kernel = weight.T. Sizes not divisible by `block_size` raise a
ValueError; every LLM kernel is a multiple of 64.

NF4 follows bitsandbytes (kQuantizeBlockwise / dQuantizeNF4 and the CPU `quantize_4bit`):
absmax per block; code = nearest NF4_CODEBOOK value of w * (1 / absmax), ties to the lower code
(the `x > midpoint` tree); two codes per byte, the first in the high nibble:
byte[i] = code[2i] << 4 | code[2i + 1].

int4 is symmetric: scale = absmax / 7, values round(w / scale) (half to even), which lie in
[-7, 7] by construction and are clipped there; -8 is never used so that 0 is exact and the range
symmetric. Stored as `jnp.int4` (4 bits each in `bytes_per_param`; XLA packs int4 on GPU/TPU,
on CPU an int4 element may occupy a byte).

Double quant (QLoRA section 3, bitsandbytes `compress_statistics=True`) applies to the float32
per-block scales (NF4 absmax or int4 scale): offset = mean, then (scale - offset) is quantized in
blocks of 256 with bitsandbytes' signed 8-bit dynamic map, nearest value ties to the lower code.
The 4-bit codes are computed with the exact float32 scale, as in bitsandbytes. Stored keys:

  kind   key            dtype        shape                     when
  nf4    codes          uint8        [n / 2]                   always
  int4   codes          int4         [n]                       always
  both   scale          scale_dtype  [n / bs]                  not double_quant
  both   scale_codes    uint8        [n / bs]                  double_quant
  both   scale_absmax   float32      [ceil(n / bs / 256)]      double_quant
  both   scale_offset   float32      []                        double_quant

For NF4 `scale` is bitsandbytes' `absmax`. With double quant `scale_dtype` is unused (nested
statistics are float32, as in bitsandbytes). The shape is not stored; pass it to `dequantize`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# bitsandbytes functional.get_4bit_type("nf4") (= create_normal_map(offset=0.9677083)), the
# NormalFloat4 values of the QLoRA paper; sorted, so code index == rank.
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)

NESTED_BLOCK_SIZE = 256  # bitsandbytes quantize_4bit: quantize_blockwise(absmax, blocksize=256)
KINDS = ("nf4", "int4")
INT4_MAX = 7


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                       total_bits: int = 8) -> np.ndarray:
  """bitsandbytes' dynamic 8-bit map (Dettmers 2015), a port of `functional.create_dynamic_map`.

  Bit-exact: torch.linspace(0.1, 1, n) in float32 is `start + step * i` below the halfway point and
  `end - step * (n - 1 - i)` above it, compiled to a fused multiply-add, emulated here in float64
  (exact product and sum, one rounding). The quirks of the original are kept (`non_sign_bits`
  ignores `signed`; the extra items reuse the last loop exponent).

  Returns:
    float32 [256], sorted ascending.
  """
  def linspace_f32(n):
    start, end = np.float32(0.1), np.float32(1.0)
    step = np.float64((end - start) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    lo = np.float64(start) + step * i
    hi = np.float64(end) - step * (n - 1 - i)
    return np.where(i < n // 2, lo, hi).astype(np.float32)

  data = []
  non_sign_bits = total_bits - 1
  additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
  for i in range(max_exponent_bits):
    fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                         else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
    boundaries = linspace_f32(fraction_items)
    means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
    scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
    data += list(scale * means)
    if signed:
      data += list(-scale * means)
  if additional_items > 0:
    boundaries = linspace_f32(additional_items + 1)
    means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
    scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
    data += list(scale * means)
    if signed:
      data += list(-scale * means)
  data += [0.0, 1.0]
  assert len(data) == 2 ** total_bits
  data += [0.0] * (256 - len(data))
  return np.sort(np.array(data, np.float32))


DYNAMIC_MAP = create_dynamic_map(signed=True)


def _midpoints(code: np.ndarray) -> np.ndarray:
  # float32 midpoints; for NF4 these equal the literals of bitsandbytes' dQuantizeNF4 tree.
  return (code[:-1] + code[1:]) / np.float32(2.0)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How a frozen kernel is quantized; hashable, so it can be a static jit argument.

  Attributes:
    kind: "nf4" (QLoRA NormalFloat4, bitsandbytes layout) or "int4" (symmetric, jnp.int4).
    block_size: values per scale, consecutive in the C-order flattened kernel; even.
    double_quant: quantize the float32 per-block scales to 8 bits (QLoRA double quantization).
    scale_dtype: dtype of the per-block scales when not double_quant ("float32" or "bfloat16").
  """
  kind: str = "nf4"
  block_size: int = 64
  double_quant: bool = True
  scale_dtype: str = "float32"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"QuantConfig.kind must be one of {KINDS}, got {self.kind!r}")
    if self.block_size <= 0 or self.block_size % 2:
      raise ValueError(f"QuantConfig.block_size must be positive and even, got {self.block_size}")
    if jnp.dtype(self.scale_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                           jnp.dtype(jnp.float16)):
      raise ValueError(f"QuantConfig.scale_dtype must be a float dtype, got {self.scale_dtype!r}")


def _check_size(shape, cfg: QuantConfig) -> int:
  n = math.prod(shape)
  if n == 0 or n % cfg.block_size:
    raise ValueError(f"cannot quantize a kernel of shape {tuple(shape)} ({n} values) in blocks of "
                     f"{cfg.block_size}: the size must be a positive multiple of the block size")
  return n


def _quantize_scales(scale: Array) -> dict[str, Array]:
  """Double quant of float32 scales [nb] -> codes [nb], absmax [ceil(nb / 256)], offset []."""
  nb = scale.shape[0]
  offset = jnp.mean(scale)
  x = scale - offset                                                  # [nb]
  # Zero padding leaves each 256-block's absmax as bitsandbytes' partial last block has it.
  x = jnp.pad(x, (0, -nb % NESTED_BLOCK_SIZE)).reshape(-1, NESTED_BLOCK_SIZE)  # [nb2, 256]
  absmax = jnp.max(jnp.abs(x), axis=-1)                               # [nb2]
  normed = x / jnp.where(absmax > 0, absmax, 1.0)[:, None]            # bnb CPU divides here
  codes = jnp.searchsorted(jnp.asarray(_midpoints(DYNAMIC_MAP)), normed, side="left")
  return {"scale_codes": codes.reshape(-1)[:nb].astype(jnp.uint8), "scale_absmax": absmax,
          "scale_offset": offset}


def _dequantize_scales(q: dict[str, Array], nb: int) -> Array:
  """Inverse of `_quantize_scales`: float32 [nb]."""
  values = jnp.asarray(DYNAMIC_MAP)[q["scale_codes"].astype(jnp.int32)]  # [nb]
  absmax = jnp.repeat(q["scale_absmax"], NESTED_BLOCK_SIZE)[:nb]          # [nb]
  return values * absmax + q["scale_offset"]


@functools.partial(jax.jit, static_argnames="cfg")
def _quantize(w: Array, cfg: QuantConfig) -> dict[str, Array]:
  blocks = w.reshape(-1, cfg.block_size).astype(jnp.float32)  # [nb, bs]
  absmax = jnp.max(jnp.abs(blocks), axis=-1)                  # [nb]
  scale = absmax if cfg.kind == "nf4" else absmax / INT4_MAX  # [nb] float32
  if cfg.double_quant:
    q = _quantize_scales(scale)
  else:
    q = {"scale": scale.astype(cfg.scale_dtype)}
    scale = q["scale"].astype(jnp.float32)  # quantize against the scale dequantize will see

  if cfg.kind == "nf4":
    # x * (1 / absmax), not x / absmax: bitsandbytes multiplies by the reciprocal.
    inv = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)
    normed = jnp.clip(blocks * inv[:, None], -1.0, 1.0).reshape(-1)          # [n]
    codes = jnp.searchsorted(jnp.asarray(_midpoints(NF4_CODEBOOK)), normed, side="left")
    codes = codes.astype(jnp.uint8).reshape(-1, 2)                            # [n / 2, 2]
    q["codes"] = (codes[:, 0] << 4) | codes[:, 1]                             # [n / 2]
  else:
    values = jnp.round(blocks / jnp.where(scale > 0, scale, 1.0)[:, None])   # [nb, bs]
    q["codes"] = jnp.clip(values, -INT4_MAX, INT4_MAX).astype(jnp.int4).reshape(-1)  # [n]
  return q


def quantize(w: np.ndarray | Array, cfg: QuantConfig) -> dict[str, Array]:
  """Quantize a kernel (float, any shape; ftjax kernels are [in, out]) blockwise to 4 bits.

  Runs as one jitted, vectorised program (compiled once per shape and cfg) on the default device;
  wrap the call in `jax.default_device(jax.devices("cpu")[0])` to keep it on the host.

  Returns:
    A plain dict of arrays (keys in the module docstring); n = w.size, bs = cfg.block_size.
  """
  _check_size(np.shape(w), cfg)
  return _quantize(jnp.asarray(w), cfg)


def dequantize(q: dict[str, Array], cfg: QuantConfig, shape, dtype=jnp.float32) -> Array:
  """The kernel back from `quantize`: codebook value * block scale, computed in float32.

  Traceable; jit it with cfg, shape and dtype static (`quantized_matmul` does).

  Args:
    q: the dict `quantize` returned.
    cfg: the config it was quantized with.
    shape: the original kernel shape, e.g. (in, out).
    dtype: the output dtype.

  Returns:
    [*shape] in `dtype`.
  """
  shape = tuple(shape)
  n = _check_size(shape, cfg)
  nb = n // cfg.block_size
  codes = q["codes"]
  if codes.size * (2 if cfg.kind == "nf4" else 1) != n:
    raise ValueError(f"{cfg.kind} codes of size {codes.size} do not fit a kernel of shape {shape}")
  if cfg.double_quant:
    scale = _dequantize_scales(q, nb)                                 # [nb]
  else:
    scale = q["scale"].astype(jnp.float32)                            # [nb]

  if cfg.kind == "nf4":
    codes = jnp.stack([codes >> 4, codes & 0xF], axis=-1)             # [n / 2, 2]
    values = jnp.asarray(NF4_CODEBOOK)[codes.reshape(-1).astype(jnp.int32)]  # [n]
  else:
    values = codes.astype(jnp.float32)                                # [n]
  w = values.reshape(nb, cfg.block_size) * scale[:, None]            # [nb, bs]
  return w.reshape(shape).astype(dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "shape", "dtype"))
def _quantized_matmul(x, q, cfg, shape, dtype):
  kernel = dequantize(q, cfg, shape, dtype)                           # [in, out]
  return jnp.einsum("...i,io->...o", x.astype(dtype), kernel)


def quantized_matmul(x: Array, q: dict[str, Array], cfg: QuantConfig, shape,
                     dtype=jnp.bfloat16) -> Array:
  """x @ dequantize(q) in the compute `dtype`, dequantizing inside one jitted program.

  Args:
    x: [..., in].
    q: a quantized [in, out] kernel.
    cfg: its QuantConfig.
    shape: (in, out).
    dtype: the compute dtype of both operands and the result.

  Returns:
    [..., out] in `dtype`.
  """
  if len(shape) != 2:
    raise ValueError(f"quantized_matmul wants a 2-D [in, out] kernel shape, got {tuple(shape)}")
  return _quantized_matmul(x, q, cfg, tuple(int(d) for d in shape), jnp.dtype(dtype))


def _bits(dtype: Any) -> int:
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.iinfo(dtype).bits  # 4 for int4, whose itemsize reads 1
  return jnp.finfo(dtype).bits if jnp.issubdtype(dtype, jnp.floating) else 8 * dtype.itemsize


def bytes_per_param(q: dict[str, Array], n_params: int) -> float:
  """Storage bytes of every array in `q` (int4 at 4 bits), divided by the kernel's n_params."""
  total_bits = sum(int(np.prod(np.shape(a))) * _bits(a.dtype) for a in q.values())
  return total_bits / 8 / n_params
