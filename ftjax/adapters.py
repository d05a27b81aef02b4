"""Many LoRA adapters over one base, served in one batch (S-LoRA / Punica style).

  model, params = ftjax.load_pretrained(base_dir)               # plain or 4-bit base
  model, params = ftjax.load_adapters(model, params, {"returns": workdir, "billing": peft_dir})
  rows = adapters.adapter_rows(model, ["returns", None, "billing"])   # -1: the base alone
  logits = model.apply({"params": params}, tokens, adapter_rows=rows)
  ro = rollout.rollout(model, params, prompt_ids, ..., adapter_rows=rows)

Each adapter is an ftjax training workdir (LoRA, rsLoRA or DoRA) or a PEFT LoRA directory;
`load_adapters(model, params, dir)` reads PEFT's multi-adapter layout (what
`PeftModel.save_pretrained` writes for several adapters: "default" at the top, every other one
in a subfolder of its name), and `save_adapters` writes it.

Per LoRA layer the adapters' factors are stacked, `multi_lora_a` [N, in, R] and
`multi_lora_b` [N, R, out] (R the largest rank: smaller ones zero-padded, which changes no
sum), and every row gathers its own (lora.apply_multi). The base params are shared as they
are: never merged, never copied. DoRA's m / ||W + s A B|| depends only on frozen params, so
it is folded here once per adapter (`multi_lora_factor`) rather than in every forward.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn, traverse_util

from ftjax import lora, peft_io
from ftjax.errors import UserError
from ftjax.lora import MultiLoraConfig

CONFIG = "adapter_config.json"


def peft_dirs(path: str) -> dict[str, str]:
  """name -> directory of the adapters in PEFT's multi-adapter layout at `path`: "default" at
  the top when it holds adapter_config.json, every subfolder that holds one by its name."""
  if not os.path.isdir(path):
    raise UserError(f"{path}: not a directory")
  out = {}
  if os.path.isfile(os.path.join(path, CONFIG)):
    out["default"] = path
  for name in sorted(os.listdir(path)):
    if os.path.isfile(os.path.join(path, name, CONFIG)):
      out[name] = os.path.join(path, name)
  if not out:
    raise UserError(f"{path}: no {CONFIG} in it or in a subfolder; not a PEFT adapter directory")
  return out


def _one(model, params, name: str, path: str) -> tuple[lora.LoraConfig, dict]:
  """(LoraConfig, flat adapter leaves) of one adapter directory, on the base `model`."""
  where = f"adapter {name!r} ({path})"
  if os.path.isfile(os.path.join(path, CONFIG)):
    try:
      m, p = peft_io.load_adapter(model, params, path)
    except UserError as e:
      raise UserError(f"{where}: {e}") from None
    if m.spec.lora is None:
      raise UserError(f"{where}: not a LoRA adapter (prefix or prompt tuning cannot be batched "
                      "per row)")
  elif os.path.isdir(os.path.join(path, "checkpoints")):
    from ftjax import workdir  # the trainers' imports, only when a workdir is served
    m, p, _, _ = workdir.load_trained(path)
    if m.spec.lora is None or m.spec.prefix is not None or m.spec.bottleneck is not None:
      raise UserError(f"{where}: the run did not train a LoRA adapter alone (full fine-tuning, "
                      "prefix or bottleneck adapters cannot be batched per row)")
    if m.cfg.scan_layers != model.cfg.scan_layers:
      raise UserError(f"{where}: scan_layers={m.cfg.scan_layers}, the base has "
                      f"{model.cfg.scan_layers}")
    ours, theirs = lora.kernel_shapes(model), lora.kernel_shapes(m)
    for key in sorted(set(ours) | set(theirs)):
      if ours.get(key) != theirs.get(key):
        raise UserError(f"{where}: trained on a different base: {'/'.join(key)} is "
                        f"{list(theirs.get(key) or [])} there, {list(ours.get(key) or [])} here")
    if m.cfg.n_layers != model.cfg.n_layers or m.cfg.vocab_size != model.cfg.vocab_size:
      raise UserError(f"{where}: trained on a different base ({m.cfg.n_layers} layers, vocab "
                      f"{m.cfg.vocab_size}; here {model.cfg.n_layers}, {model.cfg.vocab_size})")
  else:
    raise UserError(f"{where}: neither a PEFT adapter directory ({CONFIG}) nor an ftjax "
                    "workdir (checkpoints/)")
  flat = traverse_util.flatten_dict(lora.adapter_params(p))
  return m.spec.lora, {k: v for k, v in flat.items() if k[-1] in lora.LORA_LEAVES}


def load_adapters(model, params: dict, adapters: Union[Mapping[str, str], str]):
  """N LoRA adapters over the base (`model`, `params`): (model, params) serving all of them.

  Args:
    model, params: the base (dense or 4-bit), without adapters.
    adapters: name -> an ftjax workdir or a PEFT adapter directory; or one directory in
      PEFT's multi-adapter layout (`peft_dirs`).
  Returns:
    the model with AdapterSpec.multi (its `names` give each adapter's row index) and the base
    params plus the stacked adapter leaves (the base arrays themselves, not copies).
  """
  if isinstance(adapters, str):
    adapters = peft_dirs(adapters)
  if not adapters:
    raise UserError("load_adapters: no adapter given")
  spec = model.spec
  if spec.lora is not None or spec.multi is not None or spec.prefix is not None:
    raise UserError("load_adapters: the model already has an adapter; pass the base model")
  names = tuple(adapters)
  loaded = [_one(model, params, n, adapters[n]) for n in names]
  configs = tuple(c for c, _ in loaded)
  rank = max(c.rank for c in configs)
  sites = sorted({k[:-1] for _, leaves in loaded for k in leaves})
  shapes = lora.kernel_shapes(model)
  n_layers = model.cfg.n_layers
  out = {}
  for site in sites:
    d_in, d_out = shapes[site]
    lead = (n_layers,) if lora.is_stacked(site) else ()
    a = np.zeros(lead + (len(names), d_in, rank), np.float32)
    b = np.zeros(lead + (len(names), rank, d_out), np.float32)
    factor = np.ones(lead + (len(names), d_out), np.float32)
    mag = np.ones(lead + (len(names), d_out), np.float32)
    w = None
    for i, (cfg, leaves) in enumerate(loaded):
      if site + ("lora_a",) not in leaves:
        continue
      ai = np.asarray(leaves[site + ("lora_a",)], np.float32)
      bi = np.asarray(leaves[site + ("lora_b",)], np.float32)
      a[..., i, :, :cfg.rank], b[..., i, :cfg.rank, :] = ai, bi
      if not cfg.dora:
        continue
      if w is None:  # the dense (dequantized) base kernel, as lora.apply's DoRA reads it
        w = lora.dense_kernel(model, site, lora._node(params, site)["kernel"], (d_in, d_out))
      m = np.asarray(leaves[site + ("lora_magnitude",)], np.float32)
      # lora.apply's DoRA factor, in float32 with the same ops.
      wn = w + cfg.scale * jnp.matmul(jnp.asarray(ai), jnp.asarray(bi),
                                      precision=jax.lax.Precision.HIGHEST)
      f = np.asarray(jnp.asarray(m) / jnp.linalg.norm(wn, axis=-2))
      on = np.asarray(lora.layers_on(cfg, site, n_layers))
      factor[..., i, :] = np.where(on[..., None] if on.ndim else on, f, 1.0)
      mag[..., i, :] = m
    out[site + ("multi_lora_a",)] = a
    out[site + ("multi_lora_b",)] = b
    if any(c.dora for c in configs):
      out[site + ("multi_lora_factor",)] = factor
      out[site + ("multi_lora_magnitude",)] = mag
  pattern = "(" + "|".join(_path_rx(s) for s in sites) + ")"
  mcfg = MultiLoraConfig(names=names, configs=configs, rank=rank, targets=pattern)
  new_model = model.clone(spec=dataclasses.replace(spec, multi=mcfg))
  want = traverse_util.flatten_dict(nn.meta.unbox(jax.eval_shape(
      lambda: new_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]))
  adt = jnp.dtype(model.cfg.adapter_dtype)
  leaves = {}
  for key, arr in out.items():
    if tuple(want[key].shape) != arr.shape:  # a bug, not bad input: shapes come from the base
      raise AssertionError(f"{'/'.join(key)}: {arr.shape} != {want[key].shape}")
    leaves[key] = jnp.asarray(arr, jnp.float32 if key[-1] == "multi_lora_factor" else adt)
  return new_model, lora.with_adapter(params, traverse_util.unflatten_dict(leaves))


def _path_rx(site: tuple) -> str:
  import re
  return "(^|/)" + re.escape("/".join(site)) + "$"


def adapter_rows(model, names: Sequence[Optional[str]], where: str = "") -> np.ndarray:
  """int32 [B]: each row's adapter index in `model.spec.multi.names`; None or "" -> -1 (the
  base alone). An unknown name is a UserError (`where(i)` prefix: e.g. the requests file)."""
  known = model.spec.multi.names if model.spec.multi is not None else ()
  index = {n: i for i, n in enumerate(known)}
  out = np.full(len(names), -1, np.int32)
  for i, n in enumerate(names):
    if n in (None, ""):
      continue
    if n not in index:
      at = f"{where}:{i + 1}: " if where else f"row {i}: "
      raise UserError(f"{at}adapter {n!r} is not loaded (loaded: {', '.join(known) or 'none'})")
    out[i] = index[n]
  return out


def select(model, params: dict, name: str):
  """One adapter of a multi-adapter model as an ordinary LoRA model: (model, params), its
  rank unpadded; the base arrays are shared."""
  mcfg = model.spec.multi
  if mcfg is None or name not in mcfg.names:
    raise UserError(f"adapter {name!r} is not loaded")
  i = mcfg.names.index(name)
  cfg = mcfg.configs[i]
  one = model.clone(spec=dataclasses.replace(model.spec, multi=None, lora=cfg))
  flat = traverse_util.flatten_dict(params)
  leaves = {}
  for site in lora.target_paths(one):
    key = tuple(site.split("/"))
    leaves[key + ("lora_a",)] = flat[key + ("multi_lora_a",)][..., i, :, :cfg.rank]
    leaves[key + ("lora_b",)] = flat[key + ("multi_lora_b",)][..., i, :cfg.rank, :]
    if cfg.dora:
      leaves[key + ("lora_magnitude",)] = flat[key + ("multi_lora_magnitude",)][..., i, :]
  return one, lora.with_adapter(params, traverse_util.unflatten_dict(leaves))


def save_adapters(model, params: dict, out_dir: str, base_model_name_or_path: Optional[str] = None,
                  tokenizer_from: Optional[str] = None):
  """Every adapter of a multi-adapter model in PEFT's multi-adapter layout: `out_dir/<name>/`
  (adapter_config.json + adapter_model.safetensors), "default" at `out_dir` itself, as
  `PeftModel.save_pretrained` writes them; `PeftModel.load_adapter(out_dir/<name>)` reads each."""
  if model.spec.multi is None:
    raise UserError("save_adapters: the model has no multi-adapter spec (ftjax.load_adapters)")
  names = model.spec.multi.names
  for name in sorted(names, key=lambda n: n != "default"):  # the top folder before the others
    one, p = select(model, params, name)
    peft_io.save_adapter(one, p, out_dir if name == "default" else os.path.join(out_dir, name),
                         base_model_name_or_path, tokenizer_from)
