"""LoRA/DoRA: identity at init, PEFT round trips both ways, merge, swap, disable, errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import traverse_util

import ftjax
from ftjax import lora
from tests.conftest import batch_with_padding


def _logits(model, params, tokens, mask):
  return np.asarray(model.apply({"params": params}, tokens, mask=mask))


def _randomize_b(params, seed=0, scale=0.3):
  flat = traverse_util.flatten_dict(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
  for k, key in zip(sorted(flat), keys):
    if k[-1] == "lora_b":
      flat[k] = scale * jax.random.normal(key, flat[k].shape, flat[k].dtype)
  return traverse_util.unflatten_dict(flat)


def _torch_logits(model, tokens, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()


def _peft_vs_ours(path, adapter_dir, model, params, seed=1):
  """(tokens, mask, PEFT's logits with the exported adapter over the HF base, ftjax's logits)."""
  base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  tokens, mask = batch_with_padding(np.random.default_rng(seed))
  return tokens, mask, _torch_logits(peft_model, tokens, mask), _logits(model, params, tokens,
                                                                        mask)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_at_init_is_the_base_model(hf_models, dora):
  path = hf_models["llama"][0]
  base_model, base = ftjax.load_pretrained(path)
  model, params = ftjax.load_pretrained(path, lora=ftjax.LoraConfig(rank=4, dora=dora))
  tokens, mask = batch_with_padding(np.random.default_rng(0))
  a, b = _logits(base_model, base, tokens, mask), _logits(model, params, tokens, mask)
  if dora:  # m / ||W|| is 1 up to float rounding
    np.testing.assert_allclose(a, b, atol=1e-5)
  else:
    np.testing.assert_array_equal(a, b)
  n_adapted = len(lora.target_paths(model))
  assert n_adapted == 7  # all-linear: q, k, v, o, gate, up, down, stacked over the 2 layers
  # PEFT's Kaiming-uniform bound 1/sqrt(fan_in) for A, zeros for B.
  a0 = params["layers"]["attn"]["q_proj"]["lora_a"][0]
  assert np.abs(a0).max() <= 1 / np.sqrt(a0.shape[0]) and np.abs(a0).max() > 0.5 / np.sqrt(32)
  assert not np.any(params["layers"]["attn"]["q_proj"]["lora_b"])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
def test_peft_roundtrip_export(hf_models, family, variant, tmp_path):
  path, torch_base = hf_models[family]
  cfg = ftjax.LoraConfig(rank=4, alpha=8, targets="attn" if variant != "lora" else "all-linear",
                         dora=variant == "dora", rslora=variant == "rslora")
  model, params = ftjax.load_pretrained(path, lora=cfg)
  params = _randomize_b(params)
  out = str(tmp_path / "adapter")
  ftjax.save_adapter(model, params, out)
  acfg = json.load(open(os.path.join(out, "adapter_config.json")))
  assert acfg["peft_type"] == "LORA" and acfg["r"] == 4 and acfg["lora_alpha"] == 8
  assert acfg["use_dora"] == (variant == "dora") and acfg["use_rslora"] == (variant == "rslora")
  tokens, mask, ref, ours = _peft_vs_ours(path, out, model, params)
  assert np.abs(ours - ref)[mask].max() <= 1e-4
  # The adapter really changes the model.
  assert np.abs(ours - _torch_logits(torch_base, tokens, mask))[mask].max() > 1e-2


@pytest.mark.parametrize("dora", [False, True])
def test_peft_made_adapter_imports(hf_models, dora, tmp_path):
  path, _ = hf_models["mistral"]
  base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  pcfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                         init_lora_weights=False, use_dora=dora)
  pm = peft.get_peft_model(base, pcfg).eval()
  out = str(tmp_path / "peft_adapter")
  pm.save_pretrained(out)
  model, params = ftjax.load_pretrained(path)
  model, params = ftjax.load_adapter(model, params, out)
  assert len(lora.target_paths(model)) == 3  # q, v, down (stacked)
  tokens, mask = batch_with_padding(np.random.default_rng(2))
  ref = _torch_logits(pm, tokens, mask)
  assert np.abs(_logits(model, params, tokens, mask) - ref)[mask].max() <= 1e-4


def test_merge_and_save_pretrained(hf_models, tmp_path):
  path, _ = hf_models["qwen2"]
  model, params = ftjax.load_pretrained(path, lora=ftjax.LoraConfig(rank=4, dora=True))
  params = _randomize_b(params, seed=3)
  tokens, mask = batch_with_padding(np.random.default_rng(3))
  ours = _logits(model, params, tokens, mask)
  merged_model, merged = ftjax.merge(model, params)
  assert "lora_a" not in merged["layers"]["attn"]["q_proj"]
  # Merging reorders fp32 sums (x @ (W + sAB) vs x @ W + s(xA)B): rounding-level differences.
  np.testing.assert_allclose(_logits(merged_model, merged, tokens, mask)[mask], ours[mask],
                             atol=1e-4)
  out = str(tmp_path / "merged")
  ftjax.save_pretrained(model, params, out)  # merges on the way out
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert np.abs(_torch_logits(hf_model, tokens, mask) - ours)[mask].max() <= 1e-4


def test_disable_and_swap_adapters(hf_models):
  path, _ = hf_models["llama"]
  base_model, base = ftjax.load_pretrained(path)
  model, params = ftjax.load_pretrained(path, lora=ftjax.LoraConfig(rank=2, targets="qv"))
  adapters = {"orders": lora.adapter_params(_randomize_b(params, 1)),
              "returns": lora.adapter_params(_randomize_b(params, 2))}
  tokens, mask = batch_with_padding(np.random.default_rng(4))
  ref = _logits(base_model, base, tokens, mask)
  p_orders = lora.with_adapter(params, adapters["orders"])
  p_returns = lora.with_adapter(params, adapters["returns"])
  # The base arrays are shared, not copied.
  assert p_orders["embed"] is p_returns["embed"] is params["embed"]
  lo, lr = _logits(model, p_orders, tokens, mask), _logits(model, p_returns, tokens, mask)
  assert np.abs(lo - lr).max() > 1e-2 and np.abs(lo - ref).max() > 1e-2
  np.testing.assert_array_equal(_logits(lora.disable(model), p_orders, tokens, mask), ref)


def test_lora_errors(hf_models, tmp_path):
  path, _ = hf_models["llama"]
  with pytest.raises(ValueError, match="match no linear layer"):
    ftjax.load_pretrained(path, lora=ftjax.LoraConfig(targets=r"attn/qq_proj$"))
  with pytest.raises(ValueError, match="rank 64 is larger than layer"):
    ftjax.load_pretrained(path, lora=ftjax.LoraConfig(rank=64))
  # An adapter trained on another base (qwen3: q_proj is 32 -> 64) does not load on llama.
  qmodel, qparams = ftjax.load_pretrained(hf_models["qwen3"][0],
                                          lora=ftjax.LoraConfig(rank=2, targets="qv"))
  out = str(tmp_path / "qwen3_adapter")
  ftjax.save_adapter(qmodel, qparams, out)
  model, params = ftjax.load_pretrained(path)
  with pytest.raises(ftjax.CheckpointError, match="adapter_model.safetensors.*shape"):
    ftjax.load_adapter(model, params, out)
  gmodel, gparams = ftjax.load_pretrained(hf_models["gpt2"][0])
  with pytest.raises(ftjax.CheckpointError, match="does not have"):
    ftjax.load_adapter(gmodel, gparams, out)


def test_lora_over_quantized_base(hf_models):
  """4-bit kernels dequantize inside the matmul: same logits as dense dequantized kernels."""
  path, _ = hf_models["llama"]
  base_model, base = ftjax.load_pretrained(path)
  tokens, mask = batch_with_padding(np.random.default_rng(5))
  for kind in ("nf4", "int4"):
    model, params = ftjax.load_pretrained(path, quant=kind, lora=ftjax.LoraConfig(rank=4))
    q = params["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(q, dict) and q["codes"].dtype in (jnp.uint8, jnp.int4)
    assert not isinstance(params["embed"], dict)  # embeddings and norms stay dense
    # Reference: the plain model on kernels dequantized up front.
    dense_model, dense = ftjax.merge(model, params)  # B = 0: merge only dequantizes
    out = _logits(model, params, tokens, mask)
    np.testing.assert_allclose(out[mask], _logits(dense_model, dense, tokens, mask)[mask],
                               atol=1e-4)
    # Each dequantized kernel is within the 4-bit error of the original (about 10% RMS).
    w = base["layers"]["attn"]["q_proj"]["kernel"][0]
    wq = dense["layers"]["attn"]["q_proj"]["kernel"][0]
    rel = float(jnp.linalg.norm(wq - w) / jnp.linalg.norm(w))
    assert 0.02 < rel < 0.15, (kind, rel)


def test_quant_targets_are_configurable(hf_models):
  model, params = ftjax.load_pretrained(hf_models["llama"][0], quant="int4",
                                        quant_targets=r"mlp/(up|down)_proj$")
  assert isinstance(params["layers"]["mlp"]["up_proj"]["kernel"], dict)
  assert not isinstance(params["layers"]["mlp"]["gate_proj"]["kernel"], dict)
  assert not isinstance(params["layers"]["attn"]["q_proj"]["kernel"], dict)
  tokens, mask = batch_with_padding(np.random.default_rng(6))
  assert np.isfinite(_logits(model, params, tokens, mask)).all()


@pytest.mark.parametrize("targets,rslora", [("all-linear", False), ("qv", False),
                                            ("attn", True)])
def test_gpt2_lora_exports_as_fused_c_attn(hf_models, targets, rslora, tmp_path):
  """q/k/v LoRAs of rank r are one rank-3r LoRA on PEFT's c_attn (A stacked, B block-diagonal)."""
  path, torch_base = hf_models["gpt2"]
  cfg = ftjax.LoraConfig(rank=2, alpha=6, targets=targets, rslora=rslora)
  model, params = ftjax.load_pretrained(path, lora=cfg)
  params = _randomize_b(params)
  out = str(tmp_path / "adapter")
  ftjax.save_adapter(model, params, out)
  acfg = json.load(open(os.path.join(out, "adapter_config.json")))
  assert acfg["rank_pattern"] == {"c_attn": 6}
  tokens, mask, ref, ours = _peft_vs_ours(path, out, model, params)
  assert np.abs(ours - ref)[mask].max() <= 1e-4
  assert np.abs(ours - _torch_logits(torch_base, tokens, mask))[mask].max() > 1e-2
  # And back: the same layers adapted, the same logits.
  m2, p2 = ftjax.load_adapter(*ftjax.load_pretrained(path), out)
  assert lora.target_paths(m2) == lora.target_paths(model)
  assert np.abs(_logits(m2, p2, tokens, mask) - ours)[mask].max() <= 1e-5


def _peft_gpt2_c_attn(path, out, block: bool):
  base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  pcfg = peft.LoraConfig(r=6, lora_alpha=9, target_modules=["c_attn", "c_fc"],
                         rank_pattern={"c_fc": 2}, alpha_pattern={"c_fc": 5},
                         init_lora_weights=False, fan_in_fan_out=True)
  pm = peft.get_peft_model(base, pcfg).eval()
  if block:
    with torch.no_grad():
      for name, p in pm.named_parameters():
        if name.endswith("c_attn.lora_B.default.weight"):  # [3D, 3k]
          d, k = p.shape[0] // 3, p.shape[1] // 3
          for g in range(3):
            for h in range(3):
              if g != h:
                p[g * d:(g + 1) * d, h * k:(h + 1) * k] = 0.0
  pm.save_pretrained(out)
  return pm


def test_peft_gpt2_block_c_attn_imports_and_round_trips(hf_models, tmp_path):
  path, _ = hf_models["gpt2"]
  pm = _peft_gpt2_c_attn(path, str(tmp_path / "peft"), block=True)
  model, params = ftjax.load_adapter(*ftjax.load_pretrained(path), str(tmp_path / "peft"))
  assert model.spec.lora.rank == 2
  assert len(lora.target_paths(model)) == 4  # q, k, v and up_proj, stacked over 2 layers
  tokens, mask = batch_with_padding(np.random.default_rng(2))
  ref = _torch_logits(pm, tokens, mask)
  ours = _logits(model, params, tokens, mask)
  assert np.abs(ours - ref)[mask].max() <= 1e-4
  ftjax.save_adapter(model, params, str(tmp_path / "again"))
  base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  again = peft.PeftModel.from_pretrained(base, str(tmp_path / "again")).eval()
  assert np.abs(_torch_logits(again, tokens, mask) - ref)[mask].max() <= 1e-4
  from ftjax import st_io
  a = st_io.SafetensorsFile(os.path.join(str(tmp_path / "peft"), "adapter_model.safetensors"))
  b = st_io.SafetensorsFile(os.path.join(str(tmp_path / "again"), "adapter_model.safetensors"))
  for name in a.names():
    if ".c_attn." in name:
      np.testing.assert_allclose(b.get(name), a.get(name), atol=1e-6)


def test_peft_gpt2_general_c_attn_is_refused(hf_models, tmp_path):
  path, _ = hf_models["gpt2"]
  _peft_gpt2_c_attn(path, str(tmp_path / "peft"), block=False)
  model, params = ftjax.load_pretrained(path)
  with pytest.raises(ftjax.CheckpointError, match="c_attn LoRA is not block-diagonal") as e:
    ftjax.load_adapter(model, params, str(tmp_path / "peft"))
  assert "\n" not in str(e.value)


def test_float32_adapter_over_bf16_base_exports_to_peft(hf_models, tmp_path):
  path, _ = hf_models["llama"]
  model, params = ftjax.load_pretrained(path, dtype="bfloat16", compute_dtype="float32",
                                        lora=ftjax.LoraConfig(rank=4, alpha=8))
  params = _randomize_b(params)
  flat = traverse_util.flatten_dict(params)
  adapter = {k: np.asarray(v) for k, v in flat.items() if k[-1] in lora.LORA_LEAVES}
  assert {v.dtype for v in adapter.values()} == {np.dtype("float32")}
  assert flat[("embed",)].dtype == jnp.bfloat16
  out = str(tmp_path / "adapter")
  ftjax.save_adapter(model, params, out)
  # The file keeps the float32 values (a bf16 copy would be bf16-representable).
  from ftjax import st_io
  f = st_io.SafetensorsFile(os.path.join(out, "adapter_model.safetensors"))
  a = adapter[("layers", "attn", "q_proj", "lora_a")][0]  # stacked [L, in, r]: block 0
  saved = f.get("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
  np.testing.assert_array_equal(saved, a.T)
  assert np.any(a.astype(jnp.bfloat16).astype(np.float32) != a)
  # PEFT on the same bf16-rounded base, computing in float32 as ftjax does here.
  base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).float()
  peft_model = peft.PeftModel.from_pretrained(base.eval(), out).eval()
  tokens, mask = batch_with_padding(np.random.default_rng(5))
  ref = _torch_logits(peft_model, tokens, mask)
  assert np.abs(_logits(model, params, tokens, mask) - ref)[mask].max() <= 1e-4
  # And back: imported leaves are float32 and exact.
  base_model, base_params = ftjax.load_pretrained(path, dtype="bfloat16")
  _, params2 = ftjax.load_adapter(base_model, base_params, out)
  flat2 = traverse_util.flatten_dict(params2)
  for k, v in adapter.items():
    assert flat2[k].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(flat2[k]), v)


# Imports ftjax.lora and ftjax.prefix without the package's __init__ (which pulls in the whole
# public API, hf.py included) and prints every ftjax module they loaded.
_IMPORTS = """
import sys, types
pkg = types.ModuleType("ftjax"); pkg.__path__ = [sys.argv[1]]; sys.modules["ftjax"] = pkg
import ftjax.lora, ftjax.prefix
print(" ".join(sorted(m for m in sys.modules if m.startswith("ftjax."))))
"""


def test_adapter_math_imports_no_hf_or_peft_io():
  """lora.py and prefix.py sit below the HF/PEFT I/O: hf -> lora, peft_io -> hf/lora/prefix,
  never back (no import cycle through save_pretrained)."""
  out = subprocess.run([sys.executable, "-c", _IMPORTS, os.path.dirname(ftjax.__file__)],
                       check=True, capture_output=True, text=True).stdout.split()
  assert "ftjax.lora" in out and "ftjax.prefix" in out
  assert "ftjax.hf" not in out and "ftjax.peft_io" not in out and "ftjax.st_io" not in out
