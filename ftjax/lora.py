"""LoRA/DoRA adapters: initialise on a loaded base, swap, disable, merge, PEFT import/export.

Adapter leaves (`lora_a` [in, r], `lora_b` [r, out], `lora_magnitude` [out]) sit beside the
base kernel they adapt, so the base params tree is unchanged and several named adapters can
share one base: `with_adapter(base, adapters["returns"])` builds the params for one task
without copying or reloading the base arrays.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ftjax import hf, st_io
from ftjax.config import LoraConfig
from ftjax.model import Decoder

LORA_LEAVES = ("lora_a", "lora_b", "lora_magnitude")


def _is_adapter_leaf(key: tuple) -> bool:
  """LoRA leaves, and the prefix/prompt tuning params (top-level `prefix`, `prompt`)."""
  return key[-1] in LORA_LEAVES or key[0] in ("prefix", "prompt")


def adapter_params(params: dict) -> dict:
  """Only the LoRA leaves of `params`."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if _is_adapter_leaf(k)})


def base_params(params: dict) -> dict:
  """`params` without LoRA leaves."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not _is_adapter_leaf(k)})


def with_adapter(base: dict, adapter: dict) -> dict:
  """Base params plus one adapter's leaves (no array is copied)."""
  flat = dict(traverse_util.flatten_dict(base_params(base)))
  flat.update(traverse_util.flatten_dict(adapter))
  return traverse_util.unflatten_dict(flat)


def disable(model: Decoder) -> Decoder:
  """The same model with LoRA, prefix and prompt switched off: the base model, same params."""
  return model.clone(spec=dataclasses.replace(model.spec, adapters_enabled=False))


def target_paths(model: Decoder) -> list[str]:
  """Paths of the linear layers LoRA wraps ("layer_0/attn/q_proj", ...)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  flat = traverse_util.flatten_dict(shapes["params"])
  return sorted({"/".join(k[:-1]) for k in flat if k[-1] == "lora_a"})


def kernel_shapes(cfg) -> dict[tuple, tuple]:
  """Layer path -> [in, out] of every linear kernel of a plain model of `cfg` (no arrays)."""
  from flax import linen as nn
  shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 1), jnp.int32)))["params"]
  flat = traverse_util.flatten_dict(nn.meta.unbox(shapes))
  return {k[:-1]: tuple(v.shape) for k, v in flat.items() if k[-1] == "kernel"}


def dense_kernel(model: Decoder, layer: tuple, kernel, shape: tuple, dtype=jnp.float32):
  """A base kernel [in, out] as a dense array (dequantized when stored in 4 bits)."""
  if isinstance(kernel, dict):
    from ftjax import quant
    return quant.dequantize(kernel, model.spec.quant_for("/".join(layer)), shape, dtype)
  return kernel.astype(dtype)


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
  if model.spec.lora is not None and not paths:
    raise ValueError(f"LoRA targets {model.spec.lora.targets!r} (regex "
                     f"{model.spec.lora.pattern!r}) match no linear layer; layer paths look "
                     "like 'layer_0/attn/q_proj' and 'layer_0/mlp/up_proj'")

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
        flat[key] = jnp.linalg.norm(w, axis=0).astype(flat[key].dtype)
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
        w = w + lcfg.scale * (a @ b)
        if "lora_magnitude" in node:
          w = w * (node["lora_magnitude"].astype(jnp.float32) / jnp.linalg.norm(w, axis=0))
      out["kernel"] = w.astype(pdt)
      return out
    if isinstance(node, dict):
      return {k: walk(v, path + (k,)) for k, v in node.items()}
    return node

  return Decoder(model.cfg), walk(params, ())


# ----------------------------------------------------------------------------- PEFT format


def _module_names(cfg) -> dict[str, str]:
  """ftjax layer path -> HF module name, for linear layers."""
  out = {}
  for entry in hf.tensor_map(cfg):
    if entry.kind == "T" and entry.hf.endswith(".weight") and entry.paths[0][-1] == "kernel":
      out["/".join(entry.paths[0][:-1])] = entry.hf[:-len(".weight")]
  return out


def save_adapter(model: Decoder, params: dict, out_dir: str,
                 base_model_name_or_path: Optional[str] = None):
  """Write a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`).

  LoRA/DoRA as PEFT's LORA; prefix and prompt tuning as PREFIX_TUNING / PROMPT_TUNING.

  `peft.PeftModel.from_pretrained(base, out_dir)` loads it with the same logits.
  """
  lcfg = model.spec.lora
  if model.spec.prefix is not None:
    if lcfg is not None:
      raise ValueError("save_adapter: PEFT has no format for LoRA and prefix tuning together")
    from ftjax import prefix
    return prefix.save_prefix_adapter(model, params, out_dir, base_model_name_or_path)
  if lcfg is None:
    raise ValueError("save_adapter: the model has no adapter")
  if model.cfg.family == "gpt2":
    raise ValueError("save_adapter: PEFT stores GPT-2 q/k/v as one fused c_attn module; export "
                     "GPT-2 LoRA merged (format=merged) instead")
  names = _module_names(model.cfg)
  flat = traverse_util.flatten_dict(adapter_params(params))
  tensors, modules = [], []
  for key in sorted(flat):
    layer, leaf = "/".join(key[:-1]), key[-1]
    if layer not in names:
      raise ValueError(f"save_adapter: no HF module for layer {layer}")
    mod = names[layer]
    arr = np.asarray(jax.device_get(flat[key]), np.float32)
    if leaf == "lora_a":
      tensors.append((f"base_model.model.{mod}.lora_A.weight", arr.T.copy()))
      modules.append(mod)
    elif leaf == "lora_b":
      tensors.append((f"base_model.model.{mod}.lora_B.weight", arr.T.copy()))
    else:
      tensors.append((f"base_model.model.{mod}.lora_magnitude_vector", arr))
  short = sorted({m.rsplit(".", 1)[-1] for m in modules})
  all_with_short = [m for m in names.values() if m.rsplit(".", 1)[-1] in short]
  targets = short if sorted(all_with_short) == sorted(modules) else sorted(modules)
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank,
            "lora_alpha": lcfg.alpha, "lora_dropout": lcfg.dropout, "target_modules": targets,
            "use_rslora": lcfg.rslora, "use_dora": lcfg.dora, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
            "base_model_name_or_path": base_model_name_or_path, "inference_mode": True}

  def write(tmp):
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    st_io.write(os.path.join(tmp, "adapter_model.safetensors"), tensors)

  hf.write_hf_dir(out_dir, write)


def load_adapter(model: Decoder, params: dict, adapter_dir: str) -> tuple[Decoder, dict]:
  """Import a PEFT adapter (LoRA, prefix or prompt tuning) onto a loaded ftjax base.

  Returns (model with the adapter, params).
  """
  cfg_path = os.path.join(adapter_dir, "adapter_config.json")
  if not os.path.exists(cfg_path):
    raise hf.CheckpointError(f"{cfg_path}: missing; not a PEFT adapter directory")
  with open(cfg_path) as f:
    acfg = json.load(f)
  if acfg.get("peft_type") in ("PREFIX_TUNING", "PROMPT_TUNING"):
    from ftjax import prefix
    return prefix.load_prefix_adapter(model, params, adapter_dir, acfg)
  if acfg.get("peft_type") != "LORA":
    raise hf.CheckpointError(f"{cfg_path}: peft_type {acfg.get('peft_type')!r} is not LORA")
  if acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
    raise hf.CheckpointError(f"{cfg_path}: per-module rank_pattern/alpha_pattern is not supported")
  fpath = os.path.join(adapter_dir, "adapter_model.safetensors")
  if not os.path.exists(fpath):
    raise hf.CheckpointError(f"{fpath}: missing (pickle adapter_model.bin is refused)")
  f = st_io.SafetensorsFile(fpath)
  by_module = {v: k for k, v in _module_names(model.cfg).items()}
  rx = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|"
                  r"lora_magnitude_vector(?:\.weight)?)$")
  leaves, layers = {}, set()
  for name in f.names():
    m = rx.match(name)
    if not m:
      raise hf.CheckpointError(f"{fpath}: tensor {name!r} is not a LoRA tensor ftjax understands")
    mod, kind = m.groups()
    if mod not in by_module:
      raise hf.CheckpointError(f"{fpath}: tensor {name!r} targets module {mod!r}, which the base "
                               f"{model.cfg.family} model does not have (wrong base model?)")
    layer = by_module[mod]
    layers.add(layer)
    arr = f.get(name).astype(np.float32)
    leaf = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b"}.get(kind, "lora_magnitude")
    leaves[tuple(layer.split("/")) + (leaf,)] = arr.T if leaf != "lora_magnitude" else arr
  pattern = "(" + "|".join(re.escape(p) + "$" for p in sorted(layers)) + ")"
  lcfg = LoraConfig(rank=int(acfg["r"]), alpha=float(acfg["lora_alpha"]),
                    dropout=float(acfg.get("lora_dropout") or 0.0), targets=pattern,
                    rslora=bool(acfg.get("use_rslora")), dora=bool(acfg.get("use_dora")))
  new_model = model.clone(spec=dataclasses.replace(model.spec, lora=lcfg))
  shapes = jax.eval_shape(lambda: new_model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 1), jnp.int32)))["params"]
  from flax import linen as nn
  want = traverse_util.flatten_dict(nn.meta.unbox(shapes))
  pdt = jnp.dtype(model.cfg.param_dtype)
  for key, arr in leaves.items():
    if key not in want:
      raise hf.CheckpointError(f"{fpath}: no parameter {'/'.join(key)} in the base model")
    if tuple(want[key].shape) != arr.shape:
      raise hf.CheckpointError(
          f"{fpath}: {'/'.join(key)} has shape {list(arr.shape)}, the base model expects "
          f"{list(want[key].shape)} (adapter trained on a different base model?)")
  missing = [k for k in want if _is_adapter_leaf(k) and k not in leaves]
  if missing:
    raise hf.CheckpointError(f"{fpath}: tensor for {'/'.join(missing[0])} is missing")
  adapter = traverse_util.unflatten_dict({k: jnp.asarray(v, pdt) for k, v in leaves.items()})
  return new_model, with_adapter(params, adapter)
