"""LoRA/DoRA adapters: the layer's delta (`apply`), and on a params tree: initialise on a loaded
base, swap, disable, merge (PEFT I/O: peft_io.py).

Adapter leaves (`lora_a` [in, r], `lora_b` [r, out], `lora_magnitude` [out]) sit beside the
base kernel they adapt, so the base params tree is unchanged and several named adapters can
share one base: `with_adapter(base, adapters["returns"])` builds the params for one task
without copying or reloading the base arrays.

Under scanned layers a layer path (`layers/attn/q_proj`) holds the stacked [L, ...] arrays of
every block; `LoraConfig.layers` leaves zero slices in the blocks it excludes.

Serving several adapters in one batch (`MultiLoraConfig`, `apply_multi`; loaded by adapters.py)
stacks them instead: `multi_lora_a` [N, in, R], `multi_lora_b` [N, R, out] beside the kernel,
and each batch row names its adapter (S-LoRA / Punica's per-row gather).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from ftjax import quant
from ftjax.config import LoraConfig, dot_precision

# model.py imports this module for `apply`, so the functions below take the model (a
# `model.Decoder`) as an argument and build its plain twin with `_plain`, never by import.

LORA_LEAVES = ("lora_a", "lora_b", "lora_magnitude")
# apply_multi's leaves: N adapters stacked, for serving (never trained).
MULTI_LEAVES = ("multi_lora_a", "multi_lora_b", "multi_lora_factor", "multi_lora_magnitude")


@dataclasses.dataclass(frozen=True)
class MultiLoraConfig:
  """N LoRA/rsLoRA/DoRA adapters over one base, each batch row picking one (or none).

  `configs[n]` is adapter n's own LoraConfig (its rank, alpha, rslora, dora, targets, layers),
  kept for export; its A and B are zero-padded to the largest rank `rank`, which leaves
  x A B unchanged. `targets` is the regex of every layer some adapter adapts; an adapter
  that does not adapt a layer (or a block, LoraConfig.layers) has A = B = 0 there.
  """

  names: tuple[str, ...]
  configs: tuple[LoraConfig, ...]
  rank: int
  targets: str

  @property
  def scales(self) -> tuple[float, ...]:
    return tuple(c.scale for c in self.configs)

  @property
  def dora(self) -> bool:
    return any(c.dora for c in self.configs)


def _kaiming_uniform_a_sqrt5(key, shape, dtype):
  """PEFT/torch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in = shape[0]."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def apply(module: nn.Module, lcfg: LoraConfig, x: jax.Array, y: jax.Array,
          dense_kernel: Callable[[], jax.Array], layer: Optional[jax.Array] = None) -> jax.Array:
  """The output of a `model.Linear` with its LoRA/DoRA adapter; declares the adapter params.

  Args:
    module: the Linear, inside its compact call: `lora_a` [in, r], `lora_b` [r, out] (and
      `lora_magnitude` [out] for DoRA) sit beside its kernel; its axes, dtypes, precision and
      spec (adapters_enabled, LoraConfig.layers) are read.
    lcfg: the LoraConfig of this layer.
    x: the layer input [..., in].
    y: the base output x @ W [..., out] in the compute dtype.
    dense_kernel: () -> W [in, out] in the compute dtype (dequantized when 4-bit); DoRA only.
    layer: int32 [], the block index under the scan, for LoraConfig.layers.

  Returns:
    [..., out]: y + s * dropout(x) A B, or DoRA's m / ||W + s A B|| * (that).
  """
  shape = (x.shape[-1], module.features)
  if lcfg.rank > min(shape):
    raise ValueError(f"LoRA rank {lcfg.rank} is larger than layer "
                     f"{'/'.join(module.scope.path)} of shape {shape}")
  dtype, axes = module.dtype, module.axes
  a_init = (_kaiming_uniform_a_sqrt5 if lcfg.init == "kaiming"
            else nn.initializers.normal(1.0 / lcfg.rank))
  on = module.spec.lora_layer_on(layer)
  if on is not None:  # blocks outside LoraConfig.layers keep A = B = 0
    a_init = functools.partial(lambda f, key, s, d: jnp.where(on, f(key, s, d), 0), a_init)
  a = module.param("lora_a", nn.with_logical_partitioning(a_init, (axes[0], "lora")),
                   (shape[0], lcfg.rank), module.adapter_dtype)
  b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                          ("lora", axes[1])),
                   (lcfg.rank, shape[1]), module.adapter_dtype)
  if lcfg.dora:
    kernel = dense_kernel()
    mag = module.param("lora_magnitude", nn.with_logical_partitioning(
        lambda key, s, d: jnp.linalg.norm(kernel.astype(jnp.float32), axis=0).astype(d),
        (axes[1],)), (shape[1],), module.adapter_dtype)
  if not module.spec.adapters_enabled:
    return y
  xa = x
  if lcfg.dropout > 0 and module.has_rng("dropout"):
    xa = nn.Dropout(lcfg.dropout, deterministic=False)(x)
  a, b = a.astype(dtype), b.astype(dtype)
  delta = jnp.einsum("...i,ir,ro->...o", xa.astype(dtype), a, b,
                     precision=dot_precision(module.precision, dtype)) * lcfg.scale
  if on is not None:  # zero contribution, hence zero gradient, outside the chosen blocks
    delta = delta * on.astype(dtype)
  if not lcfg.dora:
    return y + delta
  # PEFT's DoRA: m / ||W + s B A|| (row norm, detached) rescales base and LoRA outputs.
  w = kernel.astype(jnp.float32) + lcfg.scale * jnp.matmul(
      a.astype(jnp.float32), b.astype(jnp.float32),
      precision=dot_precision(module.precision, jnp.float32))
  norm = jax.lax.stop_gradient(jnp.linalg.norm(w, axis=0))
  factor = (mag.astype(jnp.float32) / norm).astype(dtype)
  out = factor * (y + delta)
  return out if on is None else jnp.where(on, out, y)


def apply_multi(module: nn.Module, mcfg: MultiLoraConfig, x: jax.Array, y: jax.Array,
                rows: Optional[jax.Array]) -> jax.Array:
  """The output of a `model.Linear` under N stacked adapters, adapter `rows[b]` on row b.

  Args:
    module: the Linear; `multi_lora_a` [N, in, R], `multi_lora_b` [N, R, out] (and, with DoRA,
      `multi_lora_factor` and `multi_lora_magnitude` [N, out]) sit beside its kernel.
    x: the layer input [B, T, in]; y: the base output x @ W [B, T, out] (the base is shared:
      never merged, never copied per adapter).
    rows: int32 [B], each row's adapter index; -1 (or None for the whole batch): no adapter.
  Returns:
    [B, T, out]: row b gets y + s_n x A_n B_n with n = rows[b] (Punica's gathered BGMV), times
    DoRA's m_n / ||W + s_n A_n B_n||; a row without adapter gets its scale 0 and factor 1.
  """
  n, r, (d_in, d_out) = len(mcfg.names), mcfg.rank, (x.shape[-1], module.features)
  dtype, axes, adt = module.dtype, module.axes, module.adapter_dtype
  zeros, part = nn.initializers.zeros, nn.with_logical_partitioning
  a = module.param("multi_lora_a", part(zeros, (None, axes[0], "lora")), (n, d_in, r), adt)
  b = module.param("multi_lora_b", part(zeros, (None, "lora", axes[1])), (n, r, d_out), adt)
  if mcfg.dora:
    # DoRA's m / ||W + s A B|| depends on frozen params only: adapters.py folds it once at load
    # instead of forming N dense [in, out] sums per step. The magnitude is kept for export.
    factor = module.param("multi_lora_factor", part(nn.initializers.ones, (None, axes[1])),
                          (n, d_out), jnp.float32)
    module.param("multi_lora_magnitude", part(nn.initializers.ones, (None, axes[1])),
                 (n, d_out), adt)
  if rows is None or not module.spec.adapters_enabled:
    return y
  on = rows >= 0
  idx = jnp.where(on, rows, 0)  # [B]
  scale = jnp.where(on, jnp.asarray(mcfg.scales, jnp.float32)[idx], 0.0).astype(dtype)
  prec = dot_precision(module.precision, dtype)
  xa = jnp.einsum("bti,bir->btr", x.astype(dtype), a[idx].astype(dtype), precision=prec)
  delta = jnp.einsum("btr,bro->bto", xa, b[idx].astype(dtype), precision=prec)
  out = y + delta * scale[:, None, None]
  if not mcfg.dora:
    return out
  f = jnp.where(on[:, None], factor[idx], 1.0).astype(dtype)  # [B, out]
  return f[:, None, :] * out


BOTTLENECK_MODULES = ("attn_adapter", "mlp_adapter")  # model.Block's bottleneck adapters


def is_adapter_leaf(key: tuple) -> bool:
  """LoRA leaves, the prefix/prompt tuning params (top-level `prefix`, `prompt`), and the
  bottleneck adapters' params (`.../attn_adapter/...`, `.../mlp_adapter/...`)."""
  return (key[-1] in LORA_LEAVES or key[-1] in MULTI_LEAVES or key[0] in ("prefix", "prompt")
          or any(k in BOTTLENECK_MODULES for k in key))


def adapter_params(params: dict) -> dict:
  """Only the adapter leaves of `params` (`is_adapter_leaf`: LoRA/DoRA, prefix, prompt)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_adapter_leaf(k)})


def base_params(params: dict) -> dict:
  """`params` without its adapter leaves (`is_adapter_leaf`): the base model's params."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_adapter_leaf(k)})


def with_adapter(base: dict, adapter: dict) -> dict:
  """Base params plus one adapter's leaves (no array is copied)."""
  flat = dict(traverse_util.flatten_dict(base_params(base)))
  flat.update(traverse_util.flatten_dict(adapter))
  return traverse_util.unflatten_dict(flat)


def _plain(model):
  """The same model class on the same config, without adapters or 4-bit kernels."""
  return type(model)(model.cfg)


def disable(model):
  """The same model with LoRA, prefix and prompt switched off: the base model, same params."""
  return model.clone(spec=dataclasses.replace(model.spec, adapters_enabled=False))


@functools.lru_cache(maxsize=32)
def _init_shapes(model):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))


def init_shapes(model) -> dict:
  """`jax.eval_shape` of `model.init` on one token: {"params": ...} of ShapeDtypeStructs, boxed
  in their logical axes. Traced once per model (modules with equal configs are equal): a load,
  its adapters' init and its shardings each asked for it, a whole-model trace every time. Each
  call gets its own dicts (the leaves are immutable)."""
  try:
    shapes = _init_shapes(model)
  except TypeError:  # an unhashable field: trace it
    shapes = _init_shapes.__wrapped__(model)
  return jax.tree_util.tree_map(lambda x: x, shapes,
                                is_leaf=lambda x: isinstance(x, nn.Partitioned))


def target_paths(model) -> list[str]:
  """Paths of the linear layers LoRA wraps ("layers/attn/q_proj", ...; one per stacked param)."""
  flat = traverse_util.flatten_dict(init_shapes(model)["params"])
  return sorted({"/".join(k[:-1]) for k in flat if k[-1] == "lora_a"})


def is_stacked(layer: tuple) -> bool:
  """A layer path under the scanned blocks: its params are stacked [L, ...]."""
  return layer[0] == "layers"


def kernel_shapes(model) -> dict[tuple, tuple]:
  """Layer path -> [in, out] of every linear kernel of the plain twin of `model` (no arrays);
  one block's shape for stacked kernels."""
  shapes = init_shapes(_plain(model))["params"]
  flat = traverse_util.flatten_dict(nn.meta.unbox(shapes))
  return {k[:-1]: tuple(v.shape)[is_stacked(k):] for k, v in flat.items() if k[-1] == "kernel"}


def dense_kernel(model, layer: tuple, kernel, shape: tuple, dtype=jnp.float32):
  """A base kernel [in, out] ([L, in, out] when stacked) as a dense array (dequantized when
  stored in 4 bits, block by block)."""
  if isinstance(kernel, dict):
    deq = lambda q: quant.dequantize(q, model.spec.quant_for("/".join(layer)), shape, dtype)
    return jax.vmap(deq)(kernel) if is_stacked(layer) else deq(kernel)
  return kernel.astype(dtype)


def layers_on(lcfg: LoraConfig, layer: tuple, n_layers: int):
  """Where LoRA is active: bool [L] for a stacked layer path, a bool for an unrolled one."""
  if is_stacked(layer):
    idx = np.arange(n_layers)
    return np.ones(n_layers, bool) if lcfg.layers is None else np.isin(idx, lcfg.layers)
  i = int(layer[0].split("_")[-1])
  return lcfg.layers is None or i in lcfg.layers


def _node(params: dict, path: tuple) -> dict:
  for k in path:
    params = params[k]
  return params


@functools.lru_cache(maxsize=32)
def _adapter_init_jit(model):
  return jax.jit(lambda rng: adapter_params(
      model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]))


def _adapter_init(model):
  """The jitted adapter init, one per model: a new closure per load was traced, lowered and
  looked up in the compilation cache again at every load of the same model."""
  try:
    return _adapter_init_jit(model)
  except TypeError:  # an unhashable field
    return _adapter_init_jit.__wrapped__(model)


def init_adapters(model, params: dict, rng: jax.Array) -> dict:
  """Add freshly initialised adapter leaves (LoRA, prefix, prompt) to loaded base `params`.

  Only the adapter leaves of `model.init` are kept, so under jit the base initialisation is
  dead code: nothing of base size is built. DoRA magnitudes start at the column norms of the
  loaded base kernels, so training starts exactly at the base model.
  """
  if model.spec.lora is None and model.spec.prefix is None and model.spec.bottleneck is None:
    raise ValueError("init_adapters: the model has no LoraConfig, PrefixConfig or "
                     "BottleneckConfig")
  paths = target_paths(model)
  lcfg = model.spec.lora
  if lcfg is not None and not paths:
    raise ValueError(f"LoRA targets {lcfg.targets!r} (regex {lcfg.pattern!r}) match no linear "
                     "layer; layer paths look like 'layers/attn/q_proj' and 'layers/mlp/up_proj'")
  if lcfg is not None and lcfg.layers and max(lcfg.layers) >= model.cfg.n_layers:
    raise ValueError(f"LoraConfig.layers={lcfg.layers}: the model has {model.cfg.n_layers} "
                     "blocks (0 to n_layers - 1)")

  adapter = nn.meta.unbox(_adapter_init(model)(rng))
  if model.spec.lora is not None and model.spec.lora.dora:
    flat = traverse_util.flatten_dict(adapter)
    shapes = kernel_shapes(model)
    keys = [key for key in flat if key[-1] == "lora_magnitude"]

    # The dense kernels in one program: eagerly, each op of a 4-bit kernel's dequantization
    # compiled on its own (a hundred small compiles per model). The norms stay jnp's own
    # program, not fused into it: the same magnitudes, bit for bit.
    dense = jax.jit(lambda kernels: [dense_kernel(model, key[:-1], k, shapes[key[:-1]])
                                     for key, k in zip(keys, kernels)])
    for key, w in zip(keys, dense([_node(params, key[:-1])["kernel"] for key in keys])):
      flat[key] = jnp.linalg.norm(w, axis=-2).astype(flat[key].dtype)
    adapter = traverse_util.unflatten_dict(flat)
  return with_adapter(params, adapter)


def merge(model, params: dict) -> tuple:
  """Fold LoRA/DoRA into the base kernels: a plain model and its params.

  The sum W + s*A@B is formed in float32 and stored in the model's param dtype. A 4-bit base
  is dequantized first, so the merged kernel is dense: merging does not re-quantize (that
  would add a second rounding of the whole matrix and undo part of the adapter's update);
  the merged model equals dequant(W) + s*A@B up to the param dtype's rounding.
  """
  lcfg = model.spec.lora
  pdt = jnp.dtype(model.cfg.param_dtype)
  shapes = kernel_shapes(model)

  def walk(node, path):
    if path in shapes:  # a linear layer: kernel (+ bias) (+ LoRA leaves)
      out = {k: v for k, v in node.items()
             if k != "kernel" and k not in LORA_LEAVES + MULTI_LEAVES}
      w = dense_kernel(model, path, node["kernel"], shapes[path])
      if "lora_a" in node and lcfg is not None:
        a, b = node["lora_a"].astype(jnp.float32), node["lora_b"].astype(jnp.float32)
        # [L, in, out] @ per block when stacked; full float32 on every backend
        merged = w + lcfg.scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        if "lora_magnitude" in node:
          mag = node["lora_magnitude"].astype(jnp.float32)[..., None, :]
          merged = merged * (mag / jnp.linalg.norm(merged, axis=-2, keepdims=True))
        on = jnp.asarray(layers_on(lcfg, path, model.cfg.n_layers))
        w = jnp.where(on[..., None, None] if on.ndim else on, merged, w)
      out["kernel"] = w.astype(pdt)
      return out
    if isinstance(node, dict):
      return {k: walk(v, path + (k,)) for k, v in node.items()}
    return node

  return _plain(model), walk(params, ())
