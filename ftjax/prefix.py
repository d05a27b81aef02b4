"""Prefix and prompt tuning adapters in PEFT's formats (PREFIX_TUNING, PROMPT_TUNING).

The modules live in `model.py` (`PrefixEncoder`, the soft prompt in `Decoder`); this file
moves their params to and from PEFT adapter directories. A reparametrised prefix (MLP) is
exported as the prefixes it currently produces, PEFT's `prefix_projection=False` layout: the
MLP is a training-time device and inference needs only its output.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from ftjax import hf, st_io
from ftjax.config import PrefixConfig
from ftjax.model import Decoder, PrefixEncoder


def prefix_kv(model: Decoder, params: dict) -> jnp.ndarray:
  """The learned prefixes [L, 2, P, K, H] (through the MLP when reparametrised)."""
  return PrefixEncoder(model.cfg, model.spec.prefix).apply({"params": params["prefix"]})


def save_prefix_adapter(model: Decoder, params: dict, out_dir: str,
                        base_model_name_or_path: str | None = None):
  """Write a PEFT prefix- or prompt-tuning adapter that `PeftModel.from_pretrained` loads."""
  pc, cfg = model.spec.prefix, model.cfg
  common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": pc.length, "inference_mode": True,
            "num_layers": cfg.n_layers, "num_transformer_submodules": 1,
            "base_model_name_or_path": base_model_name_or_path}
  if pc.kind == "prefix":
    kv = np.asarray(prefix_kv(model, params), np.float32)  # [L, 2, P, K, H]
    # PEFT views a row as (layer, key/value, kv head, head dim).
    emb = kv.transpose(2, 0, 1, 3, 4).reshape(pc.length, -1)
    config = dict(common, peft_type="PREFIX_TUNING", token_dim=cfg.n_kv_heads * cfg.head_dim,
                  num_attention_heads=cfg.n_kv_heads, prefix_projection=False,
                  encoder_hidden_size=cfg.n_kv_heads * cfg.head_dim)
  else:
    emb = np.asarray(params["prompt"], np.float32)  # [P, D]
    config = dict(common, peft_type="PROMPT_TUNING", token_dim=cfg.d_model,
                  num_attention_heads=cfg.n_heads, prompt_tuning_init="RANDOM")

  def write(tmp):
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    st_io.write(os.path.join(tmp, "adapter_model.safetensors"), [("prompt_embeddings", emb)])

  hf.write_hf_dir(out_dir, write)


def load_prefix_adapter(model: Decoder, params: dict, adapter_dir: str, acfg: dict):
  """Import a PEFT PREFIX_TUNING / PROMPT_TUNING adapter: (model with the adapter, params)."""
  import dataclasses
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
