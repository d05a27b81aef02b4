"""4-bit blockwise quantization of frozen kernels for QLoRA: NF4 (with double quant) and int4.

Pure functions on plain dicts of arrays, so a quantized kernel can sit in a flax params tree in
place of its float kernel:

  cfg = QuantConfig("nf4", block_size=64, double_quant=True)
  q = quantize(kernel, cfg)                          # [..., in, out] -> dict of arrays
  w = dequantize(q, cfg, dtype=jnp.bfloat16)         # [..., in, out], jittable
  y = matmul(x, q, cfg, jnp.bfloat16)                # [..., in] -> [..., out], custom VJP

and a linear layer (`model.Linear`) declares and multiplies its kernel, dense or 4-bit, with

  kernel = kernel_param(module, (n_in, n_out), axes, cfg_or_None, init, param_dtype)
  y = dot(x, kernel, cfg_or_None, dtype, precision)

Layout: bitsandbytes'. A HF/torch weight is [out, in] = kernel.T and bitsandbytes flattens it in
C order and cuts it into consecutive blocks of `block_size`, so blocks run along `in` within one
output row (when in < block_size, a block covers block_size / in whole rows). We block the
[in, out] kernel the same way, so `dequantize(quantize(weight.T))` is
`dequantize_4bit(quantize_4bit(weight)).T`, bit for bit without double quant. Leading dims
(stacked layers [L, in, out]) are batched: each matrix is quantized on its own, as
bitsandbytes quantizes each nn.Linear.

Where a block is such a rectangle of the kernel, every code and scale array keeps the kernel's
two trailing axes, in kernel orientation, so it carries the kernel's logical axis names and
shards like a dense kernel (`logical_names`):

  kind   key            dtype        shape                      when
  nf4    codes          uint8        [..., in / 2, out]         always
  int4   codes          int4         [..., in, out]             always
  both   scale          scale_dtype  [..., in / bi, out / bo]   not double_quant
  both   scale_codes    uint8        [..., in / bi, out / bo]   double_quant
  both   scale_absmax   float32      [..., ceil(nb / 256)]      double_quant
  both   scale_offset   float32      [...]                      double_quant

with (bi, bo) = (block_size, 1) when in % block_size == 0, else (in, block_size / in), and
nb = in * out / block_size. The NF4 byte [j, o] holds the codes of (2j, o) (high nibble) and
(2j + 1, o): bitsandbytes' packed bytes, transposed.

Any other kernel (in = 80 or 144 with blocks of 64: a block ends mid-row) takes the flat
layout, bitsandbytes' arrays as they are: codes in weight orientation, [..., out, in / 2] (NF4;
bitsandbytes' bytes in order) or [..., out, in] (int4), and one scale per flat block,
`scale`/`scale_codes` [..., nb] with nb = ceil(in * out / block_size) (a partial last block has
its own absmax). A flat q has one axis fewer in its scales than in its codes (`is_flat`). Its
blocks follow no kernel axis, so all its arrays are replicated (logical names None): such a
kernel does not shard on `tensor`. NF4 with an odd `in` (a byte would straddle two rows) raises
a UserError.
NF4 follows bitsandbytes (kQuantizeBlockwise / dQuantizeNF4 and the CPU `quantize_4bit`):
absmax per block; code = nearest NF4_CODEBOOK value of w * (1 / absmax), ties to the lower code
(the `x > midpoint` tree).

int4 is symmetric: scale = absmax / 7, values round(w / scale) (half to even), which lie in
[-7, 7] by construction and are clipped there; -8 is never used so that 0 is exact and the range
symmetric. Stored as `jnp.int4` (4 bits each in `bytes_per_param`; XLA packs int4 on GPU/TPU,
on CPU an int4 element may occupy a byte).

Double quant (QLoRA section 3, bitsandbytes `compress_statistics=True`) applies to the float32
per-block scales (NF4 absmax or int4 scale): offset = mean, then (scale - offset) is quantized in
blocks of 256, taken in bitsandbytes' order (the scales of output row 0 first), with its signed
8-bit dynamic map, nearest value ties to the lower code. The 4-bit codes are computed with the
exact float32 scale, as in bitsandbytes. For NF4 `scale` is bitsandbytes' `absmax`. With double
quant `scale_dtype` is unused (nested statistics are float32, as in bitsandbytes).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import UserError

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
    block_size: values per scale, consecutive in the C-order flattened [out, in] weight
      (bitsandbytes' `blocksize`); even.
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


def block_shape(shape, cfg: QuantConfig) -> Optional[tuple[int, int]]:
  """(bi, bo): a block spans bi inputs x bo outputs of an [..., in, out] kernel, as in
  bitsandbytes' C-order blocking of the [out, in] weight; None where its blocks are no such
  rectangle (the flat layout). A UserError for a kernel no layout holds."""
  shape = tuple(int(d) for d in shape)
  bs = cfg.block_size
  if len(shape) < 2 or shape[-2] <= 0 or shape[-1] <= 0:
    raise UserError(f"cannot quantize an array of shape {shape}: want a kernel [..., in, out]")
  n_in, n_out = shape[-2], shape[-1]
  if cfg.kind == "nf4" and n_in % 2:
    raise UserError(f"cannot quantize a kernel of shape {shape} to nf4: NF4 packs two inputs "
                    f"a byte and in = {n_in} is odd (use int4, or keep the layer dense)")
  # bitsandbytes' flat blocks of the [out, in] weight are one of these two rectangles; NF4
  # packs input pairs, so in is even.
  if n_in % 2 == 0:
    if n_in % bs == 0:
      return bs, 1
    if bs % n_in == 0 and n_out % (bs // n_in) == 0:
      return n_in, bs // n_in
  return None


def is_flat(q: dict[str, Array]) -> bool:
  """`q` holds its kernel in the flat layout: its scales have one axis fewer than its codes."""
  scale = q["scale_codes"] if "scale_codes" in q else q["scale"]
  return len(scale.shape) < len(q["codes"].shape)


def _nested_index(nbi: int, nbo: int) -> Array:
  """[nbi, nbo] -> which 256-block of bitsandbytes' flat (out-major) scale order holds it."""
  bi = jnp.arange(nbi, dtype=jnp.int32)[:, None]
  bo = jnp.arange(nbo, dtype=jnp.int32)[None, :]
  return (bo * nbi + bi) // NESTED_BLOCK_SIZE


def _quantize_scales(scale: Array) -> dict[str, Array]:
  """Double quant of float32 scales [..., nbi, nbo] in bitsandbytes' order."""
  *lead, nbi, nbo = scale.shape
  nb = nbi * nbo
  flat = jnp.swapaxes(scale, -1, -2).reshape(*lead, nb)             # [..., nb], out-major
  offset = jnp.mean(flat, axis=-1)                                  # [...]
  x = flat - offset[..., None]
  # Zero padding leaves each 256-block's absmax as bitsandbytes' partial last block has it.
  pad = [(0, 0)] * len(lead) + [(0, -nb % NESTED_BLOCK_SIZE)]
  x = jnp.pad(x, pad).reshape(*lead, -1, NESTED_BLOCK_SIZE)         # [..., nb2, 256]
  absmax = jnp.max(jnp.abs(x), axis=-1)                             # [..., nb2]
  normed = x / jnp.where(absmax > 0, absmax, 1.0)[..., None]        # bnb CPU divides here
  codes = jnp.searchsorted(jnp.asarray(_midpoints(DYNAMIC_MAP)), normed.reshape(-1),
                           side="left").reshape(*lead, -1)[..., :nb]
  codes = jnp.swapaxes(codes.reshape(*lead, nbo, nbi), -1, -2)      # [..., nbi, nbo]
  return {"scale_codes": codes.astype(jnp.uint8), "scale_absmax": absmax,
          "scale_offset": offset}


def _dequantize_scales(q: dict[str, Array], flat: bool = False) -> Array:
  """Inverse of `_quantize_scales`: float32 [..., nbi, nbo] ([..., nb] when `flat`)."""
  scale_codes = q["scale_codes"][..., None] if flat else q["scale_codes"]  # flat: nbo = 1
  nbi, nbo = scale_codes.shape[-2:]
  values = jnp.asarray(DYNAMIC_MAP)[scale_codes.astype(jnp.int32)]         # [..., nbi, nbo]
  absmax = q["scale_absmax"][..., _nested_index(nbi, nbo)]                # [..., nbi, nbo]
  scale = values * absmax + q["scale_offset"][..., None, None]
  return scale[..., 0] if flat else scale


def _blocks(w: Array, bi: int, bo: int) -> Array:
  *lead, n_in, n_out = w.shape
  return w.reshape(*lead, n_in // bi, bi, n_out // bo, bo)


def _flat_blocks(weight: Array, bs: int) -> Array:
  """[..., out, in] -> its C-order values in blocks [..., nb, bs]; the last block zero-padded
  (zeros leave a partial block's absmax as bitsandbytes has it)."""
  *lead, n_out, n_in = weight.shape
  flat = weight.reshape(*lead, n_out * n_in)
  flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, -(n_out * n_in) % bs)])
  return flat.reshape(*lead, -1, bs)


def _unflat(blocks: Array, n_out: int, n_in: int) -> Array:
  """Inverse of `_flat_blocks`: [..., nb, bs] -> [..., out, in]."""
  *lead, _, _ = blocks.shape
  return blocks.reshape(*lead, -1)[..., :n_out * n_in].reshape(*lead, n_out, n_in)


@functools.partial(jax.jit, static_argnames="cfg")
def _quantize(w: Array, cfg: QuantConfig) -> dict[str, Array]:
  bshape = block_shape(w.shape, cfg)
  *lead, n_in, n_out = w.shape
  if bshape is None:  # flat: blocks of the [out, in] weight, codes [..., out, in(/2)]
    blocks = _flat_blocks(jnp.swapaxes(w.astype(jnp.float32), -1, -2), cfg.block_size)
    reduce_axes, expand = (-1,), (lambda s: s[..., None])    # blocks [..., nb, bs]
    unblock = lambda b: _unflat(b, n_out, n_in)              # noqa: E731
    pair_axis = -1
  else:
    blocks = _blocks(w.astype(jnp.float32), *bshape)        # [..., nbi, bi, nbo, bo]
    reduce_axes, expand = (-3, -1), (lambda s: s[..., :, None, :, None])
    unblock = lambda b: b.reshape(w.shape)                   # noqa: E731
    pair_axis = -2
  absmax = jnp.max(jnp.abs(blocks), axis=reduce_axes)         # [..., nbi, nbo] or [..., nb]
  scale = absmax if cfg.kind == "nf4" else absmax / INT4_MAX  # float32
  if cfg.double_quant:
    if bshape is None:  # flat scales are [nb, 1] rectangles in _quantize_scales' terms
      q = _quantize_scales(scale[..., None])
      q["scale_codes"] = q["scale_codes"][..., 0]
    else:
      q = _quantize_scales(scale)
  else:
    q = {"scale": scale.astype(cfg.scale_dtype)}
    scale = q["scale"].astype(jnp.float32)  # quantize against the scale dequantize will see
  scale = expand(scale)

  if cfg.kind == "nf4":
    # x * (1 / absmax), not x / absmax: bitsandbytes multiplies by the reciprocal.
    inv = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)
    normed = unblock(jnp.clip(blocks * inv, -1.0, 1.0))      # [..., in, out] / [..., out, in]
    codes = jnp.searchsorted(jnp.asarray(_midpoints(NF4_CODEBOOK)), normed.reshape(-1),
                             side="left").astype(jnp.uint8).reshape(normed.shape)
    # Input pairs (2j, 2j + 1) share a byte, 2j in the high nibble.
    hi = jax.lax.slice_in_dim(codes, 0, None, 2, axis=pair_axis)
    lo = jax.lax.slice_in_dim(codes, 1, None, 2, axis=pair_axis)
    q["codes"] = (hi << 4) | lo                               # [..., in/2, out] / [..., out, in/2]
  else:
    values = jnp.round(blocks / jnp.where(scale > 0, scale, 1.0))
    q["codes"] = unblock(jnp.clip(values, -INT4_MAX, INT4_MAX).astype(jnp.int4))
  return q


def quantize(w: np.ndarray | Array, cfg: QuantConfig) -> dict[str, Array]:
  """Quantize a kernel [..., in, out] (float) blockwise to 4 bits in bitsandbytes' layout.

  Runs as one jitted, vectorised program (compiled once per shape and cfg) on the default device;
  wrap the call in `jax.default_device(jax.devices("cpu")[0])` to keep it on the host.

  Returns:
    A plain dict of arrays (keys and shapes in the module docstring).
  """
  block_shape(np.shape(w), cfg)
  return _quantize(jnp.asarray(w), cfg)


def kernel_shape(q: dict[str, Array], cfg: QuantConfig) -> tuple[int, ...]:
  """The [..., in, out] shape of the kernel `q` holds."""
  *lead, rows, cols = q["codes"].shape
  pack = 2 if cfg.kind == "nf4" else 1
  return (*lead, cols * pack, rows) if is_flat(q) else (*lead, rows * pack, cols)


def logical_names(q: dict[str, Array], axes: tuple) -> dict[str, tuple]:
  """Logical axis names of each array of `q` for a kernel with names `axes` ([in, out]): codes
  and scales keep both (so they shard like the dense kernel); the nested statistics are tiny
  and replicated, and so is every array of the flat layout (its blocks follow no kernel axis)."""
  flat = is_flat(q)
  return {k: axes if k in ("codes", "scale", "scale_codes") and not flat else (None,) * np.ndim(v)
          for k, v in q.items()}


def dequantize(q: dict[str, Array], cfg: QuantConfig, shape=None, dtype=jnp.float32) -> Array:
  """The kernel back from `quantize`: codebook value * block scale, computed in float32.

  Traceable; jit it with cfg and dtype static.

  Args:
    q: the dict `quantize` returned.
    cfg: the config it was quantized with.
    shape: optional, checked: the kernel shape [..., in, out] (read from the codes).
    dtype: the output dtype.

  Returns:
    [..., in, out] in `dtype`.
  """
  full = kernel_shape(q, cfg)
  if shape is not None and tuple(shape) != full:
    raise ValueError(f"{cfg.kind} codes of shape {q['codes'].shape} hold a kernel of shape "
                     f"{full}, not {tuple(shape)}")
  bshape = block_shape(full, cfg)
  flat = bshape is None
  # [..., nbi, nbo], or [..., nb] when flat
  scale = _dequantize_scales(q, flat) if cfg.double_quant else q["scale"].astype(jnp.float32)
  codes = q["codes"]
  if cfg.kind == "nf4":
    # Unpack along the input axis: -2 of [..., in/2, out], -1 of the flat [..., out, in/2].
    codes = jnp.stack([codes >> 4, codes & 0xF], axis=-1 if flat else -2)
    codes = codes.reshape(*codes.shape[:-2], -1) if flat else codes.reshape(full)
    values = jnp.asarray(NF4_CODEBOOK)[codes.astype(jnp.int32)]
  else:
    values = codes.astype(jnp.float32)
  if flat:
    *lead, n_in, n_out = full
    w = _unflat(_flat_blocks(values, cfg.block_size) * scale[..., None], n_out, n_in)
    return jnp.swapaxes(w, -1, -2).astype(dtype)                        # [..., in, out]
  w = _blocks(values, *bshape) * scale[..., :, None, :, None]           # [..., nbi, bi, nbo, bo]
  return w.reshape(full).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x: Array, q: dict[str, Array], cfg: QuantConfig, precision) -> Array:
  return jnp.einsum("...i,io->...o", x, dequantize(q, cfg, dtype=x.dtype), precision=precision)


def _matmul_fwd(x, q, cfg, precision):
  # The residual is q itself (already held as a param): no dequantized kernel outlives the
  # forward matmul, and x is not needed for a gradient that only flows to x.
  return _matmul(x, q, cfg, precision), q


def _matmul_bwd(cfg, precision, q, dy):
  w = dequantize(q, cfg, dtype=dy.dtype)                                 # again, [in, out]
  dx = jnp.einsum("...o,io->...i", dy, w, precision=precision)
  # The base is frozen: no cotangent for codes (float0) or scales (zeros, never used).
  dq = {k: (np.zeros(v.shape, jax.dtypes.float0) if not jnp.issubdtype(v.dtype, jnp.floating)
            else jnp.zeros_like(v)) for k, v in q.items()}
  return dx, dq


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: Array, q: dict[str, Array], cfg: QuantConfig, dtype=jnp.bfloat16,
           precision=None) -> Array:
  """x @ dequantize(q) in the compute `dtype`; the backward pass dequantizes again.

  Args:
    x: [..., in].
    q: a quantized [in, out] kernel.
    cfg: its QuantConfig.
    dtype: the compute dtype of both operands and the result.
    precision: passed to the einsum (e.g. HIGHEST for true float32 matmuls).

  Returns:
    [..., out] in `dtype`; the gradient flows to x only.
  """
  if q["codes"].ndim != 2:
    raise ValueError(f"quant.matmul wants one 2-D kernel, got codes of shape {q['codes'].shape}")
  return _matmul(x.astype(dtype), q, cfg, precision)


def kernel_param(module: nn.Module, shape: tuple[int, int], axes: tuple,
                 cfg: Optional[QuantConfig], init: Callable, param_dtype: Any):
  """Declare a linear layer's `kernel` param on `module` (inside its compact call).

  Args:
    module: the layer whose scope holds the param.
    shape: the kernel's (in, out).
    axes: its logical axis names.
    cfg: None for a dense kernel; else the kernel is `quantize`d from a float32 `init`.
    init: a flax initializer (key, shape, dtype).
    param_dtype: the dense kernel's dtype.

  Returns:
    The dense kernel [in, out], or the dict of 4-bit arrays (names from `logical_names`).
  """
  if cfg is None:
    return module.param("kernel", nn.with_logical_partitioning(init, axes), shape, param_dtype)

  def quant_init(key):
    q = quantize(init(key, shape, jnp.float32), cfg)
    names = logical_names(q, axes)
    return {k: nn.Partitioned(v, names[k]) for k, v in q.items()}
  return module.param("kernel", quant_init)


def dot(x: Array, kernel, cfg: Optional[QuantConfig], dtype: Any, precision=None) -> Array:
  """x [..., in] @ a `kernel_param` kernel -> [..., out] in the compute `dtype`.

  Dense: one einsum. 4-bit: `matmul`, whose custom VJP keeps no dense kernel for the backward.
  """
  if cfg is None:
    return jnp.einsum("...i,io->...o", x.astype(dtype), kernel.astype(dtype), precision=precision)
  return matmul(x, kernel, cfg, dtype, precision)


def dense(kernel, cfg: Optional[QuantConfig], shape: tuple, dtype: Any) -> Array:
  """A `kernel_param` kernel as a dense [..., in, out] array in `dtype` (dequantized if 4-bit)."""
  return kernel.astype(dtype) if cfg is None else dequantize(kernel, cfg, shape, dtype)


def _bits(dtype: Any) -> int:
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.iinfo(dtype).bits  # 4 for int4, whose itemsize reads 1
  return jnp.finfo(dtype).bits if jnp.issubdtype(dtype, jnp.floating) else 8 * dtype.itemsize


def bytes_per_param(q: dict[str, Array], n_params: int) -> float:
  """Storage bytes of every array in `q` (int4 at 4 bits), divided by the kernel's n_params."""
  total_bits = sum(int(np.prod(np.shape(a))) * _bits(a.dtype) for a in q.values())
  return total_bits / 8 / n_params
