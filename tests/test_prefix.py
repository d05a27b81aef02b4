"""Prefix and prompt tuning: identity at length 0, PEFT parity both ways, the sampler."""

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import ftjax
from ftjax import lora
from tests.test_sampling import left_padded_prompts, sequence_logprobs


def _tokens(seed=0, b=2, t=9):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(6, 320, (b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[1, 6:] = False  # right padding in row 1
  return tokens, mask


def _randomize(params, scale=1.0, seed=0):
  out = dict(params)
  if "prefix" in params:
    out["prefix"] = jax.tree_util.tree_map(
        lambda x: scale * jax.random.normal(jax.random.PRNGKey(seed), x.shape, x.dtype),
        params["prefix"])
  if "prompt" in params:
    out["prompt"] = scale * jax.random.normal(jax.random.PRNGKey(seed), params["prompt"].shape)
  return out


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_zero_length_is_the_base_model(hf_models, kind):
  path = hf_models["llama"][0]
  base_model, base = ftjax.load_pretrained(path)
  model, params = ftjax.load_pretrained(path, prefix=ftjax.PrefixConfig(kind=kind, length=0))
  tokens, mask = _tokens()
  np.testing.assert_array_equal(model.apply({"params": params}, tokens, mask=mask),
                                base_model.apply({"params": base}, tokens, mask=mask))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("kind,reparam", [("prefix", False), ("prefix", True), ("prompt", False)])
def test_peft_parity_export(hf_models, family, kind, reparam, tmp_path):
  path, _ = hf_models[family]
  pc = ftjax.PrefixConfig(kind=kind, length=3, reparam=reparam, reparam_hidden=16)
  model, params = ftjax.load_pretrained(path, prefix=pc)
  params = _randomize(params, scale=0.5 if kind == "prompt" else 1.0)
  out = str(tmp_path / "adapter")
  ftjax.save_adapter(model, params, out)
  base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  pm = peft.PeftModel.from_pretrained(base, out).eval()
  tokens, mask = _tokens(1)
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(tokens, dtype=torch.long),
             attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
  if kind == "prompt":
    ref = ref[:, 3:]  # PEFT returns logits for the virtual tokens too
  ours = np.asarray(model.apply({"params": params}, tokens, mask=mask))
  assert np.abs(ours - ref)[mask].max() <= 1e-4
  plain = np.asarray(lora.disable(model).apply({"params": params}, tokens, mask=mask))
  assert np.abs(ours - plain)[mask].max() > 1e-2  # the adapter does something
  # And back: the PEFT directory imports into ftjax with the same logits.
  m2, p2 = ftjax.load_pretrained(path)
  m2, p2 = ftjax.load_adapter(m2, p2, out)
  np.testing.assert_allclose(np.asarray(m2.apply({"params": p2}, tokens, mask=mask))[mask],
                             ours[mask], atol=1e-5)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_sampler_with_prefix_and_prompt(hf_models, kind):
  model, params = ftjax.load_pretrained(hf_models["qwen3"][0],
                                        prefix=ftjax.PrefixConfig(kind=kind, length=4))
  params = _randomize(params, 0.5)
  tokens, mask = left_padded_prompts(np.random.default_rng(0))
  out = ftjax.generate(model, params, tokens, mask, max_new_tokens=8, temperature=1.0,
                       rng=jax.random.PRNGKey(1), bucket=False)
  ref = sequence_logprobs(model, params, tokens, mask, np.asarray(out.tokens))
  np.testing.assert_allclose(np.asarray(out.logprobs), ref, atol=1e-5)


def test_prefix_errors(hf_models, tmp_path):
  with pytest.raises(ValueError, match="kind"):
    ftjax.PrefixConfig(kind="suffix")
  model, params = ftjax.load_pretrained(hf_models["llama"][0],
                                        prefix=ftjax.PrefixConfig(length=2))
  out = str(tmp_path / "a")
  ftjax.save_adapter(model, params, out)
  qmodel, qparams = ftjax.load_pretrained(hf_models["qwen3"][0])  # head_dim 16, 2 kv heads
  with pytest.raises(ftjax.CheckpointError, match="prompt_embeddings.*shape"):
    ftjax.load_adapter(qmodel, qparams, out)
  with pytest.raises(ValueError, match="save_adapter"):
    ftjax.save_pretrained(model, params, str(tmp_path / "merged"))
