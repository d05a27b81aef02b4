"""LoRA/DoRA adapters: initialise on a loaded base, swap, disable, merge (PEFT I/O: peft_io.py).

Adapter leaves (`lora_a` [in, r], `lora_b` [r, out], `lora_magnitude` [out]) sit beside the
base kernel they adapt, so the base params tree is unchanged and several named adapters can
share one base: `with_adapter(base, adapters["returns"])` builds the params for one task
without copying or reloading the base arrays.

Under scanned layers a layer path (`layers/attn/q_proj`) holds the stacked [L, ...] arrays of
every block; `LoraConfig.layers` leaves zero slices in the blocks it excludes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ftjax.config import LoraConfig
from ftjax.model import Decoder

LORA_LEAVES = ("lora_a", "lora_b", "lora_magnitude")


def is_adapter_leaf(key: tuple) -> bool:
  """LoRA leaves, and the prefix/prompt tuning params (top-level `prefix`, `prompt`)."""
  return key[-1] in LORA_LEAVES or key[0] in ("prefix", "prompt")


def adapter_params(params: dict) -> dict:
  """Only the LoRA leaves of `params`."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_adapter_leaf(k)})


def base_params(params: dict) -> dict:
  """`params` without LoRA leaves."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_adapter_leaf(k)})


def with_adapter(base: dict, adapter: dict) -> dict:
  """Base params plus one adapter's leaves (no array is copied)."""
  flat = dict(traverse_util.flatten_dict(base_params(base)))
  flat.update(traverse_util.flatten_dict(adapter))
  return traverse_util.unflatten_dict(flat)


def disable(model: Decoder) -> Decoder:
  """The same model with LoRA, prefix and prompt switched off: the base model, same params."""
  return model.clone(spec=dataclasses.replace(model.spec, adapters_enabled=False))


def target_paths(model: Decoder) -> list[str]:
  """Paths of the linear layers LoRA wraps ("layers/attn/q_proj", ...; one per stacked param)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  flat = traverse_util.flatten_dict(shapes["params"])
  return sorted({"/".join(k[:-1]) for k in flat if k[-1] == "lora_a"})


def is_stacked(layer: tuple) -> bool:
  """A layer path under the scanned blocks: its params are stacked [L, ...]."""
  return layer[0] == "layers"


def kernel_shapes(cfg) -> dict[tuple, tuple]:
  """Layer path -> [in, out] of every linear kernel of a plain model of `cfg` (no arrays);
  one block's shape for stacked kernels."""
  from flax import linen as nn
  shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 1), jnp.int32)))["params"]
  flat = traverse_util.flatten_dict(nn.meta.unbox(shapes))
  return {k[:-1]: tuple(v.shape)[is_stacked(k):] for k, v in flat.items() if k[-1] == "kernel"}


def dense_kernel(model: Decoder, layer: tuple, kernel, shape: tuple, dtype=jnp.float32):
  """A base kernel [in, out] ([L, in, out] when stacked) as a dense array (dequantized when
  stored in 4 bits, block by block)."""
  if isinstance(kernel, dict):
    from ftjax import quant
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


def init_adapters(model: Decoder, params: dict, rng: jax.Array) -> dict:
  """Add freshly initialised adapter leaves (LoRA, prefix, prompt) to loaded base `params`.

  Only the adapter leaves of `model.init` are kept, so under jit the base initialisation is
  dead code: nothing of base size is built. DoRA magnitudes start at the column norms of the
  loaded base kernels, so training starts exactly at the base model.
  """
  if model.spec.lora is None and model.spec.prefix is None:
    raise ValueError("init_adapters: the model has no LoraConfig or PrefixConfig")
  paths = target_paths(model)
  lcfg = model.spec.lora
  if lcfg is not None and not paths:
    raise ValueError(f"LoRA targets {lcfg.targets!r} (regex {lcfg.pattern!r}) match no linear "
                     "layer; layer paths look like 'layers/attn/q_proj' and 'layers/mlp/up_proj'")
  if lcfg is not None and lcfg.layers and max(lcfg.layers) >= model.cfg.n_layers:
    raise ValueError(f"LoraConfig.layers={lcfg.layers}: the model has {model.cfg.n_layers} "
                     "blocks (0 to n_layers - 1)")

  @jax.jit
  def init(rng):
    return adapter_params(model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])

  from flax import linen as nn
  adapter = nn.meta.unbox(init(rng))
  if model.spec.lora is not None and model.spec.lora.dora:
    flat = traverse_util.flatten_dict(adapter)
    shapes = kernel_shapes(model.cfg)
    for key in list(flat):
      if key[-1] == "lora_magnitude":
        layer = key[:-1]
        w = dense_kernel(model, layer, _node(params, layer)["kernel"], shapes[layer])
        flat[key] = jnp.linalg.norm(w, axis=-2).astype(flat[key].dtype)
    adapter = traverse_util.unflatten_dict(flat)
  return with_adapter(params, adapter)


def merge(model: Decoder, params: dict) -> tuple[Decoder, dict]:
  """Fold LoRA/DoRA into the base kernels: a plain model and its params.

  The sum W + s*A@B is formed in float32 and stored in the model's param dtype. A 4-bit base
  is dequantized first, so the merged kernel is dense: merging does not re-quantize (that
  would add a second rounding of the whole matrix and undo part of the adapter's update);
  the merged model equals dequant(W) + s*A@B up to the param dtype's rounding.
  """
  lcfg = model.spec.lora
  pdt = jnp.dtype(model.cfg.param_dtype)
  shapes = kernel_shapes(model.cfg)

  def walk(node, path):
    if path in shapes:  # a linear layer: kernel (+ bias) (+ LoRA leaves)
      out = {k: v for k, v in node.items() if k != "kernel" and k not in LORA_LEAVES}
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

  return Decoder(model.cfg), walk(params, ())
