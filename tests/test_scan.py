"""Scanned layers: unrolled mode still matches transformers, the train step's program does not
grow with depth, and per-layer LoRA targeting (LoraConfig.layers) trains and exports only those
layers."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import ftjax
from ftjax import partition, st_io
from ftjax.train import common, sft
from tests.conftest import VOCAB, batch_with_padding


def _logits(model, params, tokens, mask):
  return np.asarray(model.apply({"params": params}, jnp.asarray(tokens), mask=jnp.asarray(mask)))


def _torch_logits(model, tokens, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(mask.astype(np.int64))).logits.float().numpy()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unrolled_mode_matches_transformers_and_scanned(hf_models, family, tmp_path):
  path, ref_model = hf_models[family]
  scanned, sp = ftjax.load_pretrained(path)
  model, params = ftjax.load_pretrained(path, scan_layers=False)
  assert "layer_1" in params and "layers" not in params and "layers" in sp
  # The unrolled params are the stacked ones, unstacked.
  for i in range(model.cfg.n_layers):
    jax.tree_util.tree_map(lambda a, b, i=i: np.testing.assert_array_equal(a, b[i]),
                           params[f"layer_{i}"], sp["layers"])
  tokens, mask = batch_with_padding(np.random.default_rng(4))
  ours = _logits(model, params, tokens, mask)
  assert np.abs(ours - _torch_logits(ref_model, tokens, mask))[mask].max() <= 1e-4
  np.testing.assert_allclose(ours, _logits(scanned, sp, tokens, mask), atol=1e-5)
  out = str(tmp_path / "unrolled")
  ftjax.save_pretrained(model, params, out)
  orig = st_io.SafetensorsFile(os.path.join(path, "model.safetensors"))
  new = st_io.SafetensorsFile(os.path.join(out, "model.safetensors"))
  for name in new.names():
    np.testing.assert_array_equal(new.get(name), orig.get(name))


def _train_step(n_layers: int, scan: bool = True):
  """A jitted LoRA SFT step of a tiny random model of depth `n_layers` and its arguments."""
  cfg = ftjax.config.get_preset("tiny", n_layers=n_layers, d_model=32, mlp_dim=64, n_heads=2,
                                n_kv_heads=2, vocab_size=64, scan_layers=scan)
  model = ftjax.Decoder(cfg, ftjax.model.AdapterSpec(lora=ftjax.LoraConfig(rank=2)))
  params = ftjax.init_params(model, jax.random.PRNGKey(0))
  trainable, frozen, _ = common.split_params(params, partition.rules_for("lora"))
  schedule = optax.constant_schedule(1e-2)
  tx = optax.adam(schedule)
  state = common.init_state(trainable, tx, 0)
  seq = np.random.default_rng(0).integers(0, 64, (2, 9)).astype(np.int32)
  batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": np.ones((2, 8), np.float32)}
  return sft.make_step(model, tx, schedule), (state, frozen, batch)


def _program_size(n_layers: int, scan: bool = True) -> int:
  """Characters of the lowered train step; its arguments by shape only (no init, no compile)."""
  made = {}

  def args():
    made["step"], out = _train_step(n_layers, scan)
    return out
  shapes = jax.eval_shape(args)
  return len(jax.jit(made["step"]).lower(*shapes).as_text())


def test_train_step_program_does_not_grow_with_depth():
  """Compile time follows the program's size: under scanned layers the LoRA train step lowers to
  the same program for 4 and 32 layers (deterministic, unlike timing a compile), while
  unrolled layers grow it with depth."""
  shallow, deep = _program_size(4), _program_size(32)
  assert deep < 1.1 * shallow, (shallow, deep)
  assert _program_size(8, scan=False) > 1.5 * _program_size(4, scan=False)


def test_deep_model_steps_compile_once():
  step, (state, frozen, batch) = _train_step(32)
  traced = jax.jit(chex.assert_max_traces(lambda *a: step(*a), n=1))
  losses = []
  for _ in range(3):
    state, metrics = traced(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]


def _three_layer_llama(out_dir):
  import transformers as T
  from tests.conftest import hf_config
  torch.manual_seed(7)
  hf_cfg = hf_config("llama")
  hf_cfg.num_hidden_layers = 3
  T.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(out_dir)
  return out_dir


def test_lora_on_chosen_layers_trains_and_exports_only_those(tmp_path):
  path = _three_layer_llama(str(tmp_path / "base"))
  lcfg = ftjax.LoraConfig(rank=2, alpha=4, targets="attn", layers=(0, 2))
  model, params = ftjax.load_pretrained(path, lora=lcfg)
  a = params["layers"]["attn"]["q_proj"]["lora_a"]  # [L, in, r]
  assert a.shape[0] == 3 and np.any(a[0]) and not np.any(a[1]) and np.any(a[2])
  trainable, frozen, _ = common.split_params(params, partition.rules_for("lora"))
  schedule = optax.constant_schedule(3e-2)
  tx = common.make_optimizer("adamw", schedule, weight_decay=0.1)
  state = common.init_state(trainable, tx, 0)
  step = jax.jit(sft.make_step(model, tx, schedule))
  seq = np.random.default_rng(0).integers(3, VOCAB, (4, 13)).astype(np.int32)
  batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": np.ones((4, 12), np.float32)}
  for _ in range(3):
    state, _ = step(state, frozen, batch)
  params = partition.merge(state["params"], frozen)
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    node = params["layers"]["attn"][name]
    assert not np.any(node["lora_a"][1]) and not np.any(node["lora_b"][1])  # frozen at zero
    assert np.any(node["lora_b"][0]) and np.any(node["lora_b"][2])  # trained
  # PEFT export: only layers 0 and 2, and PEFT computes the same logits.
  out = str(tmp_path / "adapter")
  ftjax.save_adapter(model, params, out)
  acfg = json.load(open(os.path.join(out, "adapter_config.json")))
  assert acfg["layers_to_transform"] == [0, 2]
  names = st_io.SafetensorsFile(os.path.join(out, "adapter_model.safetensors")).names()
  assert names and not any(".layers.1." in n for n in names)
  assert any(".layers.0." in n for n in names) and any(".layers.2." in n for n in names)
  base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  pm = peft.PeftModel.from_pretrained(base, out).eval()
  tokens, mask = batch_with_padding(np.random.default_rng(1))
  ours = _logits(model, params, tokens, mask)
  assert np.abs(ours - _torch_logits(pm, tokens, mask))[mask].max() <= 1e-4
  # Merging folds in only the chosen layers.
  merged_model, merged = ftjax.merge(model, params)
  np.testing.assert_allclose(_logits(merged_model, merged, tokens, mask)[mask], ours[mask],
                             atol=1e-4)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_layers_to_transform_imports(tmp_path, dora):
  path = _three_layer_llama(str(tmp_path / "base"))
  base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  pcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                         layers_to_transform=[1, 2], init_lora_weights=False, use_dora=dora)
  pm = peft.get_peft_model(base, pcfg).eval()
  out = str(tmp_path / "peft_adapter")
  pm.save_pretrained(out)
  model, params = ftjax.load_pretrained(path)
  model, params = ftjax.load_adapter(model, params, out)
  assert model.spec.lora.layers == (1, 2)
  assert not np.any(params["layers"]["attn"]["q_proj"]["lora_a"][0])
  tokens, mask = batch_with_padding(np.random.default_rng(2))
  ref = _torch_logits(pm, tokens, mask)
  assert np.abs(_logits(model, params, tokens, mask) - ref)[mask].max() <= 1e-4
