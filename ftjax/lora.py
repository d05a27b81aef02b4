"""LoRA/DoRA adapters: initialise on a loaded base, swap, disable, merge, PEFT import/export.

Adapter leaves (`lora_a` [in, r], `lora_b` [r, out], `lora_magnitude` [out]) sit beside the
base kernel they adapt, so the base params tree is unchanged and several named adapters can
share one base: `with_adapter(base, adapters["returns"])` builds the params for one task
without copying or reloading the base arrays.

Under scanned layers a layer path (`layers/attn/q_proj`) holds the stacked [L, ...] arrays of
every block; PEFT I/O splits them into per-block modules (`model.layers.{i}.self_attn.q_proj`)
and back. `LoraConfig.layers` leaves zero slices in the blocks it excludes; they are not
exported (PEFT's `layers_to_transform`).
"""

from __future__ import annotations

import dataclasses
import json
import math
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


# ----------------------------------------------------------------------------- PEFT format


def _module_names(cfg) -> dict[str, str]:
  """ftjax layer path -> HF module name, for linear layers (GPT-2's q, k, v -> one c_attn).

  Paths are the unrolled ones (`layer_{i}/attn/q_proj`): PEFT I/O goes through `_unstack` and
  `_restack` for stacked params.
  """
  cfg = cfg.replace(scan_layers=False)
  out = {}
  for entry in hf.tensor_map(cfg):
    if not entry.hf.endswith(".weight") or entry.paths[0][-1] != "kernel":
      continue
    if entry.kind == "T" or cfg.family == "gpt2":  # GPT-2's Conv1D kernels are [in, out]
      for path in entry.paths:
        out["/".join(path[:-1])] = entry.hf[:-len(".weight")]
  return out


def _block_of(path: str) -> int:
  return int(path.split("/")[0][len("layer_"):])


def _unstack(flat: dict, lcfg: LoraConfig, n_layers: int) -> dict:
  """Stacked adapter leaves (`layers/...` [L, ...]) as unrolled per-block leaves
  (`layer_{i}/...`), for the blocks LoRA is active in only."""
  out = {}
  for key, arr in flat.items():
    if not is_stacked(key[:-1]):
      out[key] = arr
      continue
    on = layers_on(lcfg, key[:-1], n_layers)
    for i in range(n_layers):
      if on[i]:
        out[(f"layer_{i}",) + key[1:]] = arr[i]
  return out


def _restack(fpath: str, leaves: dict, n_layers: int) -> tuple[dict, tuple]:
  """Inverse of `_unstack`: (stacked leaves with zero slices for absent blocks, the blocks).

  One LoraConfig.layers serves every target of a stacked model, so every adapted module kind
  must cover the same blocks (as PEFT's `layers_to_transform` makes it).
  """
  blocks: dict[tuple, set] = {}
  for key in leaves:
    blocks.setdefault(key[1:], set()).add(_block_of(key[0]))
  sets = {tuple(sorted(b)) for b in blocks.values()}
  if len(sets) > 1:
    raise hf.CheckpointError(f"{fpath}: the adapted modules cover different layers; ftjax's "
                             "stacked layers take one layer set for all target modules (load "
                             "with scan_layers=False)")
  out = {}
  for key, arr in leaves.items():
    buf = out.setdefault(("layers",) + key[1:], np.zeros((n_layers,) + arr.shape, np.float32))
    if buf.shape[1:] != arr.shape:
      raise hf.CheckpointError(f"{fpath}: {'/'.join(key)} has shape {list(arr.shape)}, other "
                               f"layers have {list(buf.shape[1:])}")
    buf[_block_of(key[0])] = arr
  return out, (sets.pop() if sets else ())


def _fused_scale_alpha(lcfg: LoraConfig, parts: int) -> float:
  """lora_alpha of a rank parts*r module with the scale of rank r (alpha/r or alpha/sqrt r)."""
  return lcfg.alpha * (math.sqrt(parts) if lcfg.rslora else parts)


def _fuse_qkv(layers: list[str], leaves: dict, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """q/k/v LoRAs of rank r as one rank-3r LoRA on the fused [D, 3D] c_attn kernel.

  [x_q, x_k, x_v] = x @ [A_q B_q, A_k B_k, A_v B_v] = x @ [A_q A_k A_v] @ blockdiag(B_q, B_k,
  B_v): A stacked along the rank, B block-diagonal. A projection without a LoRA gets zero
  blocks (its delta stays zero: both of its factors' gradients are zero).
  """
  d_in = next(leaves[(lay, "lora_a")].shape[0] for lay in layers if (lay, "lora_a") in leaves)
  outs = []
  for lay in layers:
    out = leaves.get((lay, "lora_b"))
    outs.append(out.shape[1] if out is not None else None)
  d_out = next(o for o in outs if o is not None)
  a = np.zeros((d_in, 3 * rank), np.float32)
  b = np.zeros((3 * rank, 3 * d_out), np.float32)
  for g, lay in enumerate(layers):
    if (lay, "lora_a") in leaves:
      a[:, g * rank:(g + 1) * rank] = leaves[(lay, "lora_a")]
      b[g * rank:(g + 1) * rank, g * d_out:(g + 1) * d_out] = leaves[(lay, "lora_b")]
  return a, b


def save_adapter(model: Decoder, params: dict, out_dir: str,
                 base_model_name_or_path: Optional[str] = None):
  """Write a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`).

  LoRA/DoRA as PEFT's LORA; prefix and prompt tuning as PREFIX_TUNING / PROMPT_TUNING.
  GPT-2's q/k/v LoRAs of rank r go out as one rank-3r LoRA on PEFT's fused `c_attn` (see
  `_fuse_qkv`), with `rank_pattern`/`alpha_pattern` keeping alpha/r.

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
  gpt2 = model.cfg.family == "gpt2"
  if gpt2 and lcfg.dora:
    raise ValueError("save_adapter: DoRA on GPT-2 has no PEFT export (the fused c_attn "
                     "magnitude); export it merged (format=merged) instead")
  names = _module_names(model.cfg)
  # One PEFT module per block; blocks outside LoraConfig.layers are not written.
  flat = _unstack(traverse_util.flatten_dict(adapter_params(params)), lcfg, model.cfg.n_layers)
  leaves, by_module = {}, {}
  for key in sorted(flat):
    layer, leaf = "/".join(key[:-1]), key[-1]
    if layer not in names:
      raise ValueError(f"save_adapter: no HF module for layer {layer}")
    leaves[(layer, leaf)] = np.asarray(jax.device_get(flat[key]), np.float32)
    by_module.setdefault(names[layer], set()).add(layer)
  tensors, fused = [], []
  for mod in sorted(by_module):
    prefix_ = f"base_model.model.{mod}"
    if mod.endswith(".c_attn") and gpt2:
      layer0 = sorted(by_module[mod])[0].rsplit("/", 1)[0]
      a, b = _fuse_qkv([f"{layer0}/{x}_proj" for x in "qkv"], leaves, lcfg.rank)
      fused.append(mod)
    else:
      (layer,) = by_module[mod]
      a, b = leaves[(layer, "lora_a")], leaves[(layer, "lora_b")]
      if (layer, "lora_magnitude") in leaves:
        tensors.append((f"{prefix_}.lora_magnitude_vector", leaves[(layer, "lora_magnitude")]))
    tensors.append((f"{prefix_}.lora_A.weight", a.T.copy()))
    tensors.append((f"{prefix_}.lora_B.weight", b.T.copy()))
  modules = sorted(by_module)
  short = sorted({m.rsplit(".", 1)[-1] for m in modules})
  in_layers = lambda path: lcfg.layers is None or _block_of(path) in lcfg.layers
  all_with_short = sorted({m for path, m in names.items()
                           if m.rsplit(".", 1)[-1] in short and in_layers(path)})
  targets = short if all_with_short == modules else modules
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank,
            "lora_alpha": lcfg.alpha, "lora_dropout": lcfg.dropout, "target_modules": targets,
            "use_rslora": lcfg.rslora, "use_dora": lcfg.dora, "bias": "none",
            "fan_in_fan_out": gpt2, "init_lora_weights": True, "modules_to_save": None,
            "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
            "layers_to_transform": None if lcfg.layers is None else list(lcfg.layers)}
  if fused:
    config["rank_pattern"] = {"c_attn": 3 * lcfg.rank}
    config["alpha_pattern"] = {"c_attn": _fused_scale_alpha(lcfg, 3)}

  def write(tmp):
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    st_io.write(os.path.join(tmp, "adapter_model.safetensors"), tensors)

  hf.write_hf_dir(out_dir, write)


def _pattern_value(patterns: dict, module: str, default):
  """PEFT's rank_pattern/alpha_pattern lookup: the first key matching the module name's end."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _split_qkv(fpath: str, mod: str, a: np.ndarray, b: np.ndarray):
  """Inverse of `_fuse_qkv`: rank-3k c_attn factors (a [D, 3k], b [3k, 3D]) -> {g: (a, b)}.

  Only the block form splits exactly; a general fused LoRA (what PEFT trains from its own
  init) mixes q, k and v and has no per-projection equivalent.
  """
  r, d3 = b.shape
  if r % 3 or d3 % 3:
    raise hf.CheckpointError(f"{fpath}: {mod} LoRA has rank {r}, not 3k: a general fused c_attn "
                             "LoRA cannot be split into q/k/v LoRAs (merge it in PEFT instead)")
  k, d = r // 3, d3 // 3
  out = {}
  for g in range(3):
    for h in range(3):
      if g != h and np.any(b[g * k:(g + 1) * k, h * d:(h + 1) * d]):
        raise hf.CheckpointError(
            f"{fpath}: {mod} LoRA is not block-diagonal over q/k/v (a general fused c_attn "
            "LoRA); it cannot be split into q/k/v LoRAs (merge it in PEFT instead)")
    ag, bg = a[:, g * k:(g + 1) * k], b[g * k:(g + 1) * k, g * d:(g + 1) * d]
    if np.any(ag) or np.any(bg):  # all-zero blocks: a projection ftjax did not adapt
      out[g] = (ag, bg)
  return out


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
  fpath = os.path.join(adapter_dir, "adapter_model.safetensors")
  if not os.path.exists(fpath):
    raise hf.CheckpointError(f"{fpath}: missing (pickle adapter_model.bin is refused)")
  f = st_io.SafetensorsFile(fpath)
  layers_of: dict[str, list[str]] = {}
  for layer, mod in _module_names(model.cfg).items():
    layers_of.setdefault(mod, []).append(layer)  # GPT-2's c_attn: [q, k, v]
  rx = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|"
                  r"lora_magnitude_vector(?:\.weight)?)$")
  raw: dict[str, dict] = {}
  for name in f.names():
    m = rx.match(name)
    if not m:
      raise hf.CheckpointError(f"{fpath}: tensor {name!r} is not a LoRA tensor ftjax understands")
    mod, kind = m.groups()
    if mod not in layers_of:
      raise hf.CheckpointError(f"{fpath}: tensor {name!r} targets module {mod!r}, which the base "
                               f"{model.cfg.family} model does not have (wrong base model?)")
    raw.setdefault(mod, {})[kind.split(".")[0]] = f.get(name).astype(np.float32)
  rslora, dora = bool(acfg.get("use_rslora")), bool(acfg.get("use_dora"))
  scale_of = lambda alpha, r: alpha / (math.sqrt(r) if rslora else r)
  r0, alpha0 = int(acfg["r"]), float(acfg["lora_alpha"])
  per_layer = {}  # layer -> (a [in, k], b [k, out], PEFT scale, magnitude or None)
  for mod, parts in raw.items():
    if "lora_A" not in parts or "lora_B" not in parts:
      raise hf.CheckpointError(f"{fpath}: {mod} has no lora_A/lora_B pair")
    scale = scale_of(float(_pattern_value(acfg.get("alpha_pattern"), mod, alpha0)),
                     int(_pattern_value(acfg.get("rank_pattern"), mod, r0)))
    a, b = parts["lora_A"].T, parts["lora_B"].T
    layers = layers_of[mod]
    if len(layers) == 3:  # GPT-2 c_attn
      if dora:
        raise hf.CheckpointError(f"{fpath}: DoRA on GPT-2's fused c_attn cannot be split into "
                                 "q/k/v adapters")
      for g, (ag, bg) in _split_qkv(fpath, mod, a, b).items():
        per_layer[layers[g]] = (ag, bg, scale, None)
    else:
      per_layer[layers[0]] = (a, b, scale, parts.get("lora_magnitude_vector"))
  ranks = sorted({a.shape[1] for a, _, _, _ in per_layer.values()})
  if len(ranks) != 1:
    raise hf.CheckpointError(f"{fpath}: LoRA ranks {ranks} differ across modules; ftjax uses one "
                             "rank for all layers")
  # One ftjax rank and scale (the adapter's global alpha/r); a module whose PEFT scale differs
  # (alpha_pattern, GPT-2's fused c_attn) gets its B rescaled, so every delta is unchanged.
  rank, scale0 = ranks[0], scale_of(alpha0, r0)
  alpha = scale0 * (math.sqrt(rank) if rslora else rank)
  leaves = {}
  for layer, (a, b, scale, mag) in per_layer.items():
    key = tuple(layer.split("/"))
    leaves[key + ("lora_a",)] = a
    leaves[key + ("lora_b",)] = b if scale == scale0 else b * (scale / scale0)
    if mag is not None:
      leaves[key + ("lora_magnitude",)] = mag
  only, n = None, model.cfg.n_layers
  if model.cfg.scan_layers:
    leaves, present = _restack(fpath, leaves, n)
    only = present if len(present) < n else None
  paths = sorted({"/".join(k[:-1]) for k in leaves})
  pattern = "(" + "|".join(re.escape(p) + "$" for p in paths) + ")"
  lcfg = LoraConfig(rank=rank, alpha=alpha, dropout=float(acfg.get("lora_dropout") or 0.0),
                    targets=pattern, rslora=rslora, dora=dora, layers=only)
  new_model = model.clone(spec=dataclasses.replace(model.spec, lora=lcfg))
  shapes = jax.eval_shape(lambda: new_model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 1), jnp.int32)))["params"]
  from flax import linen as nn
  want = traverse_util.flatten_dict(nn.meta.unbox(shapes))
  adt = jnp.dtype(model.cfg.adapter_dtype)
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
  adapter = traverse_util.unflatten_dict({k: jnp.asarray(v, adt) for k, v in leaves.items()})
  return new_model, with_adapter(params, adapter)
