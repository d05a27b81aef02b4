"""HF interop: logit parity per family, save/load round trips, sharded files, bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import ftjax
from ftjax import st_io
from tests.conftest import FAMILIES, batch_with_padding


def hf_logits(model, tokens, mask, position_ids=None):
  with torch.no_grad():
    kw = {} if position_ids is None else {"position_ids": torch.tensor(position_ids)}
    return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(mask.astype(np.int64)), **kw).logits.float().numpy()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_logit_parity(hf_models, family, side):
  path, ref_model = hf_models[family]
  model, params = ftjax.load_pretrained(path, dtype="float32")
  tokens, mask = batch_with_padding(np.random.default_rng(1), side=side)
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  ref = hf_logits(ref_model, tokens, mask, positions)
  out = np.asarray(model.apply({"params": params}, jnp.asarray(tokens), mask=jnp.asarray(mask)))
  assert out.dtype == np.float32 and out.shape == ref.shape
  assert np.abs(out - ref)[mask].max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_roundtrip(hf_models, family, tmp_path):
  path, ref_model = hf_models[family]
  model, params = ftjax.load_pretrained(path)
  out = str(tmp_path / "export")
  ftjax.save_pretrained(model, params, out)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens, mask = batch_with_padding(np.random.default_rng(2))
  np.testing.assert_allclose(hf_logits(reloaded, tokens, mask), hf_logits(ref_model, tokens, mask),
                             atol=1e-5)
  # ftjax -> HF -> ftjax is exact.
  model2, params2 = ftjax.load_pretrained(out)
  assert model2.cfg == model.cfg
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         params, params2)
  # And the HF tensors are bit-identical to the originals.
  orig = st_io.SafetensorsFile(os.path.join(path, "model.safetensors"))
  new = st_io.SafetensorsFile(os.path.join(out, "model.safetensors"))
  for name in new.names():
    np.testing.assert_array_equal(new.get(name), orig.get(name))


def test_sharded_save_and_bf16(hf_models, tmp_path):
  path, ref_model = hf_models["llama"]
  model, params = ftjax.load_pretrained(path)
  out = str(tmp_path / "sharded")
  ftjax.save_pretrained(model, params, out, max_shard_bytes=20_000)
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) > 1
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens, mask = batch_with_padding(np.random.default_rng(3))
  np.testing.assert_allclose(hf_logits(reloaded, tokens, mask), hf_logits(ref_model, tokens, mask),
                             atol=1e-5)
  _, params2 = ftjax.load_pretrained(out)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), params, params2)
  # bf16 on disk loads in transformers as bf16.
  out16 = str(tmp_path / "bf16")
  ftjax.save_pretrained(model, params, out16, dtype="bfloat16")
  m16 = transformers.AutoModelForCausalLM.from_pretrained(out16, dtype=torch.bfloat16)
  assert next(m16.parameters()).dtype == torch.bfloat16
  model16, params16 = ftjax.load_pretrained(out16, dtype="bfloat16")
  assert params16["embed"].dtype == jnp.bfloat16
  logits = model16.apply({"params": params16}, jnp.asarray(tokens))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_bf16_compute_close_to_fp32(hf_models):
  path, _ = hf_models["qwen3"]
  model, params = ftjax.load_pretrained(path)
  model16, _ = ftjax.load_pretrained(path, compute_dtype="bfloat16")
  tokens, mask = batch_with_padding(np.random.default_rng(4))
  a = np.asarray(model.apply({"params": params}, tokens, mask=mask))[mask]
  b = np.asarray(model16.apply({"params": params}, tokens, mask=mask))[mask]
  rel = np.linalg.norm(a - b) / np.linalg.norm(a)
  assert 0 < rel < 3e-2


def test_gpt2_checkpoint_without_transformer_prefix(hf_models, tmp_path):
  """The Hub's gpt2 safetensors were saved from GPT2Model: names have no `transformer.`."""
  path, ref_model = hf_models["gpt2"]
  d = tmp_path / "gpt2_bare"
  d.mkdir()
  shutil.copy(os.path.join(path, "config.json"), d / "config.json")
  f = st_io.SafetensorsFile(os.path.join(path, "model.safetensors"))
  st_io.write(str(d / "model.safetensors"),
              [(n.removeprefix("transformer."), f.get(n)) for n in f.names()])
  model, params = ftjax.load_pretrained(str(d))
  tokens, mask = batch_with_padding(np.random.default_rng(5))
  out = np.asarray(model.apply({"params": params}, tokens, mask=mask))
  assert np.abs(out - hf_logits(ref_model, tokens, mask))[mask].max() <= 1e-4


# ----------------------------------------------------------------------------- bad input


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _one_line_error(fn, *match):
  with pytest.raises(ftjax.CheckpointError) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg
  for m in match:
    assert m in msg, msg
  return msg


def test_missing_config(tmp_path):
  _one_line_error(lambda: ftjax.load_pretrained(str(tmp_path)), "config.json", "missing")


def test_unknown_model_type(hf_models, tmp_path):
  d = _copy(hf_models["llama"][0], tmp_path / "m")
  cfg = json.load(open(os.path.join(d, "config.json")))
  cfg["model_type"] = "falcon"
  json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
  msg = _one_line_error(lambda: ftjax.load_pretrained(d), "config.json", "falcon")
  for fam in FAMILIES:
    assert fam in msg


def _rewrite(d, edit):
  fpath = os.path.join(d, "model.safetensors")
  f = st_io.SafetensorsFile(fpath)
  tensors = edit({n: f.get(n) for n in f.names()})
  del f
  st_io.write(fpath, list(tensors.items()))
  return fpath


def test_wrong_shape(hf_models, tmp_path):
  d = _copy(hf_models["llama"][0], tmp_path / "m")
  name = "model.layers.1.self_attn.k_proj.weight"
  fpath = _rewrite(d, lambda t: {**t, name: t[name][:, :-1]})
  _one_line_error(lambda: ftjax.load_pretrained(d), fpath, name, "shape")


def test_missing_tensor(hf_models, tmp_path):
  d = _copy(hf_models["qwen3"][0], tmp_path / "m")
  name = "model.layers.0.self_attn.q_norm.weight"
  _rewrite(d, lambda t: {k: v for k, v in t.items() if k != name})
  _one_line_error(lambda: ftjax.load_pretrained(d), d, name, "missing")


def test_pickle_refused(hf_models, tmp_path):
  d = _copy(hf_models["llama"][0], tmp_path / "m")
  os.remove(os.path.join(d, "model.safetensors"))
  open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"\x80\x04not really")
  _one_line_error(lambda: ftjax.load_pretrained(d), "pytorch_model.bin", "pickle")


def test_corrupt_safetensors(hf_models, tmp_path):
  d = _copy(hf_models["llama"][0], tmp_path / "m")
  open(os.path.join(d, "model.safetensors"), "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
  with pytest.raises(st_io.SafetensorsError, match="model.safetensors"):
    ftjax.load_pretrained(d)


def test_failed_save_leaves_old_export_intact(hf_models, tmp_path):
  path, _ = hf_models["llama"]
  model, params = ftjax.load_pretrained(path)
  out = str(tmp_path / "export")
  ftjax.save_pretrained(model, params, out)
  before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
  broken = dict(params)
  del broken["final_norm"]
  with pytest.raises(KeyError):
    ftjax.save_pretrained(model, broken, out)
  after = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
  assert before == after
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".ftjax-tmp")]


@pytest.mark.parametrize("exchange", ["renameat2", "two_renames"])
def test_interrupted_save_leaves_old_or_new_export(hf_models, tmp_path, monkeypatch, exchange):
  """A failure injected at each rename of an export over an existing one: old or new, whole."""
  from ftjax import hf
  if exchange == "two_renames":
    monkeypatch.setattr(hf, "_exchange", lambda a, b: False)
  path, _ = hf_models["llama"]
  model, params = ftjax.load_pretrained(path)
  new_params = jax.tree_util.tree_map(lambda x: x + 1.0, params)
  out = str(tmp_path / "export")
  contents = lambda d: {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}
  ftjax.save_pretrained(model, new_params, str(tmp_path / "new"), max_shard_bytes=20_000)
  new = contents(str(tmp_path / "new"))
  real_replace = os.replace
  for fail_at in range(1, 50):
    shutil.rmtree(out, ignore_errors=True)
    ftjax.save_pretrained(model, params, out)  # one shard
    old = contents(out)
    calls = [0]

    def replace(src, dst, _at=fail_at, calls=calls):
      calls[0] += 1
      if calls[0] == _at:
        raise KeyboardInterrupt("injected")
      return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    try:
      ftjax.save_pretrained(model, new_params, out, max_shard_bytes=20_000)  # several shards
      done = True
    except KeyboardInterrupt:
      done = False
    finally:
      monkeypatch.setattr(os, "replace", real_replace)
    hf._recover(out)  # what the next export does first
    assert contents(out) == (new if done else old) or contents(out) == new, fail_at
    if done:
      break
  assert done and fail_at > 2
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
  transformers.AutoModelForCausalLM.from_pretrained(out)


def test_bf16_base_keeps_trainable_heads_float32(hf_models):
  path, _ = hf_models["qwen2"]
  _, params = ftjax.load_pretrained(path, dtype="bfloat16", head="score",
                                    prefix=ftjax.PrefixConfig("prompt", length=2))
  assert params["embed"].dtype == jnp.bfloat16
  assert params["score"].dtype == jnp.float32 and params["prompt"].dtype == jnp.float32
  _, params = ftjax.load_pretrained(path, dtype="bfloat16", head="score",
                                    adapter_dtype="bfloat16")
  assert params["score"].dtype == jnp.bfloat16
