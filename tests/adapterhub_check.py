"""Loads ftjax's AdapterHub exports with the `adapters` library and compares logits to ftjax's.

Run by tests/test_adapterhub.py with a python that has adapters 1.3.0 (and so transformers
4.57.x: FTJAX_ADAPTERS_PYTHON, default /work/venvs/ahub/bin/python), not imported by pytest:

  python tests/adapterhub_check.py CASES.json

CASES.json: [{"name", "base", "adapter", "npz", "atol"}], npz holding `tokens` [B, T] and
ftjax's `base` and `adapted` logits. Per case: the base alone in transformers (adapters.init,
no adapter active) against ftjax's base, then `load_adapter` (pytorch_adapter.bin, then
adapter.safetensors) + `set_active_adapters` against ftjax with the adapters. Prints one JSON
line per case; exits 1 on any mismatch, missing or unexpected key.
"""

import json
import sys

import numpy as np
import torch
import transformers as T

import adapters


def base_config(path):
  """The base's config for transformers 4.x. A config.json written by transformers 5 keeps rope
  settings in `rope_parameters`, which 4.x does not read (it would run the default rope): they
  are passed as 4.x's `rope_theta` / `rope_scaling`."""
  with open(f"{path}/config.json") as f:
    raw = json.load(f)
  kw = {}
  rope = dict(raw.get("rope_parameters") or {})
  if rope and "rope_scaling" not in raw:
    if "rope_theta" in rope:
      kw["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
      kw["rope_scaling"] = rope
  return T.AutoConfig.from_pretrained(path, **kw)


def logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def check(case):
  ref = np.load(case["npz"])
  tokens, atol = ref["tokens"], float(case["atol"])
  model = T.AutoModelForCausalLM.from_pretrained(
      case["base"], config=base_config(case["base"]), torch_dtype=torch.float32).eval()
  adapters.init(model)
  out = {"name": case["name"], "adapters": adapters.__version__,
         "transformers": T.__version__}
  out["base_diff"] = float(np.abs(logits(model, tokens) - ref["base"]).max())
  ok = out["base_diff"] <= atol
  for st in (False, True):
    info = {}
    name = model.load_adapter(case["adapter"], load_as=f"ftjax_{int(st)}", loading_info=info,
                              use_safetensors=st)
    model.set_active_adapters(name)
    model.eval()
    key = "safetensors" if st else "bin"
    missing = [k for k in info.get("missing_keys", []) if f".{name}." in k]
    out[f"{key}_missing"], out[f"{key}_unexpected"] = missing, info.get("unexpected_keys", [])
    out[f"{key}_diff"] = float(np.abs(logits(model, tokens) - ref["adapted"]).max())
    ok &= out[f"{key}_diff"] <= atol and not missing and not out[f"{key}_unexpected"]
  # the adapters moved the logits: the check above could have failed
  out["adapter_effect"] = float(np.abs(ref["adapted"] - ref["base"]).max())
  ok &= out["adapter_effect"] > 100 * atol
  out["ok"] = bool(ok)
  return out


def main():
  with open(sys.argv[1]) as f:
    cases = json.load(f)
  results = [check(c) for c in cases]
  for r in results:
    print(json.dumps(r))
  sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
  main()
