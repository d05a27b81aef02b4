"""PEFT adapter directories <-> ftjax adapters: LORA (and DoRA), PREFIX_TUNING, PROMPT_TUNING.

`save_adapter` writes `adapter_config.json` + `adapter_model.safetensors` that
`peft.PeftModel.from_pretrained(base, dir)` loads with the same logits; `load_adapter` reads
one onto a loaded ftjax base. The adapter math lives in `lora.py` and `prefix.py`, the HF
module names and atomic directory writes in `hf.py`; this module only translates between them.

Under scanned layers a layer path (`layers/attn/q_proj`) holds the stacked [L, ...] arrays of
every block; PEFT I/O splits them into per-block modules (`model.layers.{i}.self_attn.q_proj`)
and back. `LoraConfig.layers` leaves zero slices in the blocks it excludes; they are not
exported (PEFT's `layers_to_transform`). A reparametrised prefix (MLP) is exported as the
prefixes it currently produces, PEFT's `prefix_projection=False` layout: the MLP is a
training-time device and inference needs only its output.
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
from flax import linen as nn, traverse_util

from ftjax import hf, st_io
from ftjax.config import LoraConfig, PrefixConfig
from ftjax.lora import adapter_params, is_adapter_leaf, is_stacked, layers_on, with_adapter
from ftjax.model import Decoder
from ftjax.prefix import prefix_kv


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
                 base_model_name_or_path: Optional[str] = None, tokenizer_from: str = None,
                 export_info: Optional[dict] = None, readme: Optional[str] = None):
  """Write a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`).

  LoRA/DoRA as PEFT's LORA; prefix and prompt tuning as PREFIX_TUNING / PROMPT_TUNING.
  GPT-2's q/k/v LoRAs of rank r go out as one rank-3r LoRA on PEFT's fused `c_attn` (see
  `_fuse_qkv`), with `rank_pattern`/`alpha_pattern` keeping alpha/r.

  `peft.PeftModel.from_pretrained(base, out_dir)` loads it with the same logits.
  `tokenizer_from`, `export_info` and `readme` (the model card) as in `hf.save_pretrained`.
  """
  lcfg = model.spec.lora
  if model.spec.bottleneck is not None:
    raise ValueError(hf.BOTTLENECK_NO_MERGE)
  if model.spec.prefix is not None:
    if lcfg is not None:
      raise ValueError("save_adapter: PEFT has no format for LoRA and prefix tuning together")
    return _save_prefix_adapter(model, params, out_dir, base_model_name_or_path, tokenizer_from,
                                export_info, readme)
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
    if tokenizer_from:
      hf.copy_tokenizer(tokenizer_from, tmp)

  hf.write_hf_dir(out_dir, write, {"format": "peft", **(export_info or {})}, readme)


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
    return _load_prefix_adapter(model, params, adapter_dir, acfg)
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
  want = traverse_util.flatten_dict(nn.meta.unbox(shapes))
  adt = jnp.dtype(model.cfg.adapter_dtype)
  for key, arr in leaves.items():
    if key not in want:
      raise hf.CheckpointError(f"{fpath}: no parameter {'/'.join(key)} in the base model")
    if tuple(want[key].shape) != arr.shape:
      raise hf.CheckpointError(
          f"{fpath}: {'/'.join(key)} has shape {list(arr.shape)}, the base model expects "
          f"{list(want[key].shape)} (adapter trained on a different base model?)")
  missing = [k for k in want if is_adapter_leaf(k) and k not in leaves]
  if missing:
    raise hf.CheckpointError(f"{fpath}: tensor for {'/'.join(missing[0])} is missing")
  adapter = traverse_util.unflatten_dict({k: jnp.asarray(v, adt) for k, v in leaves.items()})
  return new_model, with_adapter(params, adapter)


# ----------------------------------------------------------------- prefix and prompt tuning


def _save_prefix_adapter(model: Decoder, params: dict, out_dir: str,
                        base_model_name_or_path: str | None = None, tokenizer_from: str = None,
                        export_info: Optional[dict] = None, readme: Optional[str] = None):
  """Write a PEFT prefix- or prompt-tuning adapter that `PeftModel.from_pretrained` loads."""
  pc, cfg = model.spec.prefix, model.cfg
  shared = {"task_type": "CAUSAL_LM", "num_virtual_tokens": pc.length, "inference_mode": True,
            "num_layers": cfg.n_layers, "num_transformer_submodules": 1,
            "base_model_name_or_path": base_model_name_or_path}
  if pc.kind == "prefix":
    kv = np.asarray(prefix_kv(model, params), np.float32)  # [L, 2, P, K, H]
    # PEFT views a row as (layer, key/value, kv head, head dim).
    emb = kv.transpose(2, 0, 1, 3, 4).reshape(pc.length, -1)
    config = dict(shared, peft_type="PREFIX_TUNING", token_dim=cfg.n_kv_heads * cfg.head_dim,
                  num_attention_heads=cfg.n_kv_heads, prefix_projection=False,
                  encoder_hidden_size=cfg.n_kv_heads * cfg.head_dim)
  else:
    emb = np.asarray(params["prompt"], np.float32)  # [P, D]
    config = dict(shared, peft_type="PROMPT_TUNING", token_dim=cfg.d_model,
                  num_attention_heads=cfg.n_heads, prompt_tuning_init="RANDOM")

  def write(tmp):
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    st_io.write(os.path.join(tmp, "adapter_model.safetensors"), [("prompt_embeddings", emb)])
    if tokenizer_from:
      hf.copy_tokenizer(tokenizer_from, tmp)

  hf.write_hf_dir(out_dir, write, {"format": "peft", **(export_info or {})}, readme)


def _load_prefix_adapter(model: Decoder, params: dict, adapter_dir: str, acfg: dict):
  """Import a PEFT PREFIX_TUNING / PROMPT_TUNING adapter: (model with the adapter, params)."""
  fpath = os.path.join(adapter_dir, "adapter_model.safetensors")
  if not os.path.exists(fpath):
    raise hf.CheckpointError(f"{fpath}: missing (pickle adapter_model.bin is refused)")
  f = st_io.SafetensorsFile(fpath)
  if "prompt_embeddings" not in f.names():
    raise hf.CheckpointError(f"{fpath}: tensor 'prompt_embeddings' is missing")
  emb = f.get("prompt_embeddings").astype(np.float32)
  cfg, p = model.cfg, int(acfg["num_virtual_tokens"])
  adt = jnp.dtype(cfg.adapter_dtype)
  if acfg["peft_type"] == "PREFIX_TUNING":
    if acfg.get("prefix_projection"):
      raise hf.CheckpointError(f"{fpath}: prefix_projection=True adapters are not supported")
    want = (p, cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim)
    kind = "prefix"
  else:
    want, kind = (p, cfg.d_model), "prompt"
  if emb.shape != want:
    raise hf.CheckpointError(f"{fpath}: tensor 'prompt_embeddings' has shape {list(emb.shape)}, "
                             f"the base model expects {list(want)} (different base model?)")
  spec = dataclasses.replace(model.spec, prefix=PrefixConfig(kind=kind, length=p))
  params = dict(params)
  if kind == "prefix":
    kv = emb.reshape(p, cfg.n_layers, 2, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2, 0, 3, 4)
    params["prefix"] = {"kv": jnp.asarray(kv, adt)}
  else:
    params["prompt"] = jnp.asarray(emb, adt)
  return model.clone(spec=spec), params
