"""Bottleneck adapters in the `adapters` library's layout (AdapterHub), for `model.load_adapter`.

  python experiments/export.py --workdir=/tmp/bn --out=/tmp/bn_ahub --format=adapterhub

  # with adapters 1.3.0 (it needs transformers 4.57.x; ftjax runs on transformers 5):
  model = AutoModelForCausalLM.from_pretrained(base); adapters.init(model)
  name = model.load_adapter("/tmp/bn_ahub"); model.set_active_adapters(name)

What `save_adapter` of adapters 1.3.0 writes for a bottleneck adapter: `adapter_config.json`
(its full BnConfig and the model's type, hidden size and class) and the weights under the
library's module names, `pytorch_adapter.bin` (what `load_adapter` reads by default; needs
torch) and `adapter.safetensors` (`load_adapter(..., use_safetensors=True)`; needs none).

The math is the same, not a look-alike. In adapters' decoder layers (llama, mistral and gpt2
patched; qwen2 and qwen3 hooked on o_proj / down_proj) a sublayer's output h and the residual
x go through `Adapter.pre_forward`, `forward` and `post_forward`. With `original_ln_before=False`
the adapter reads h itself and returns h + up(act(down(h))) (`residual_before_ln=True`: its
residual is h; no adapter layer norms, scaling 1.0, no gating, dropout 0), and
`original_ln_after=True` adds x: x + h + up(act(down(h))), model.Bottleneck's block output.
adapters' own presets differ in one field each, which is why the config is written in full:
SeqBnConfig (Pfeiffer) has `original_ln_before=True`, which feeds the adapter x + h on these
pre-norm models; DoubleSeqBnConfig (Houlsby) uses swish. The bottleneck width is
int(hidden_size // reduction_factor), at least 1, in both.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import jax
import numpy as np
from flax import traverse_util

from ftjax import hf, st_io
from ftjax.config import BottleneckConfig

VERSION = "1.3.0"  # the adapters release this layout was checked against (tests/test_adapterhub.py)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "pytorch_adapter.bin"
SAFE_WEIGHTS_NAME = "adapter.safetensors"
# Files of this layout: an export in another format over an old one must not keep them.
FILES = (CONFIG_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_NAME)

# model_type -> (the causal LM class adapters records, the prefix of its decoder layers); the
# model types adapters 1.3.0 adds bottleneck adapters to (its model mixins and plugin
# interfaces) among the families ftjax loads.
MODELS = {
    "llama": ("LlamaForCausalLM", "model.layers"),
    "mistral": ("MistralForCausalLM", "model.layers"),
    "qwen2": ("Qwen2ForCausalLM", "model.layers"),
    "qwen3": ("Qwen3ForCausalLM", "model.layers"),
    "gpt2": ("GPT2LMHeadModel", "transformer.h"),
}
# ftjax's BottleneckConfig.activation -> the name adapters gives transformers' get_activation.
ACTIVATIONS = {"relu": "relu", "silu": "swish", "gelu_tanh": "gelu_new", "gelu": "gelu"}
# ftjax's site -> adapters' BottleneckLayer (location_key mh_adapter / output_adapter).
SITES = {"attn": "attention_adapters", "mlp": "output_adapters"}


def refusal(family: str, head: str = "lm", train_extra: str = "") -> Optional[str]:
  """Why a bottleneck run has no exact AdapterHub export (one line), or None."""
  if family not in MODELS:
    return (f"the adapters library ({VERSION}) adds no bottleneck adapters to model_type "
            f"{family!r} (it does to {', '.join(MODELS)})")
  if head != "lm":
    return (f"model.head={head}: the adapters layout would hold the bottleneck adapters "
            "without the trained head")
  if train_extra:
    return (f"adapter.train_extra={train_extra!r}: params trained beside the bottleneck "
            "adapters have no place in the adapters layout")
  return None


def bn_config(bc: BottleneckConfig) -> dict:
  """adapters' BnConfig (every field, as its `to_dict` writes them) for `bc`."""
  return {
      "mh_adapter": "attn" in bc.sites(), "output_adapter": "mlp" in bc.sites(),
      "reduction_factor": int(bc.reduction_factor),
      "non_linearity": ACTIVATIONS[bc.activation],
      "original_ln_before": False, "original_ln_after": True, "residual_before_ln": True,
      "ln_before": False, "ln_after": False, "adapter_residual_before_ln": False,
      "scaling": 1.0, "use_gating": False, "is_parallel": False, "dropout": 0.0,
      "init_weights": "bert", "init_weights_seed": None, "inv_adapter": None,
      "inv_adapter_reduction_factor": None, "cross_adapter": False, "leave_out": [],
      "phm_layer": False, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False,
      "shared_phm_rule": True, "factorized_phm_rule": False, "phm_c_init": "normal",
      "phm_init_range": 0.0001, "learn_phm": True, "hypercomplex_nonlinearity": "glorot-uniform",
      "phm_rank": 1, "phm_bias": True, "stochastic_depth": 0.0,
  }


def adapter_name(workdir: str) -> str:
  """The adapter's name in the layout: the workdir's folder name, with what would break
  adapters' dotted module names replaced (`load_adapter(..., load_as=...)` renames it)."""
  name = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(os.path.abspath(workdir)))
  return name or "bottleneck"


def tensors(model, params: dict, name: str) -> list[tuple[str, np.ndarray]]:
  """(adapters' parameter name, float32 array) for every bottleneck weight of `model`:
  torch Linear layout, [out, in] (down [D, R] -> adapter_down.0.weight [R, D])."""
  cfg, bc = model.cfg, model.spec.bottleneck
  prefix = MODELS[cfg.family][1]
  flat = traverse_util.flatten_dict(params)
  out = []
  for i in range(cfg.n_layers):
    for site in bc.sites():
      def get(leaf, i=i, site=site):
        key = ("layers", f"{site}_adapter", leaf) if cfg.scan_layers else (
            f"layer_{i}", f"{site}_adapter", leaf)
        arr = np.asarray(jax.device_get(flat[key]), np.float32)
        return arr[i] if cfg.scan_layers else arr
      mod = f"{prefix}.{i}.{SITES[site]}.adapters.{name}"
      out += [(f"{mod}.adapter_down.0.weight", get("down").T.copy()),
              (f"{mod}.adapter_down.0.bias", get("down_bias")),
              (f"{mod}.adapter_up.weight", get("up").T.copy()),
              (f"{mod}.adapter_up.bias", get("up_bias"))]
  return out


def full_config(model, name: str, model_name: str = "") -> dict:
  """adapter_config.json: what adapters' `build_full_config` writes for a causal LM."""
  cfg = model.cfg
  return {"config": bn_config(model.spec.bottleneck), "hidden_size": cfg.d_model,
          "model_class": MODELS[cfg.family][0], "model_name": model_name or "",
          "model_type": cfg.family, "name": name, "version": f"adapters.{VERSION}"}


def save(model, params: dict, out_dir: str, name: str = "bottleneck",
         base_model_name_or_path: Optional[str] = None, tokenizer_from: Optional[str] = None,
         export_info: Optional[dict] = None, readme: Optional[str] = None):
  """Writes `model`'s bottleneck adapters to `out_dir` in adapters' layout (see the module
  docstring); `tokenizer_from`, `export_info` and `readme` as in `hf.save_pretrained`."""
  if model.spec.bottleneck is None:
    raise ValueError("adapterhub.save: the model has no bottleneck adapters")
  why = refusal(model.cfg.family, model.cfg.head)
  if why:
    raise ValueError(why)
  pairs = tensors(model, params, name)
  config = full_config(model, name, base_model_name_or_path)

  def write(tmp):
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    st_io.write(os.path.join(tmp, SAFE_WEIGHTS_NAME), pairs)
    try:  # torch only for the .bin that load_adapter reads by default
      import torch
    except ImportError:
      pass
    else:
      torch.save({k: torch.tensor(v) for k, v in pairs}, os.path.join(tmp, WEIGHTS_NAME))
    if tokenizer_from:
      hf.copy_tokenizer(tokenizer_from, tmp)

  hf.write_hf_dir(out_dir, write, {"format": "adapterhub", **(export_info or {})}, readme)
