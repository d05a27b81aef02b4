"""The KV-cache sampler against transformers' generate and against the training forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ftjax
from ftjax import sampling
from tests.conftest import FAMILIES


def left_padded_prompts(rng, b=3, t=7):
  tokens = rng.integers(6, 320, (3, t)).astype(np.int32)
  mask = np.ones((3, t), bool)
  mask[1, :3] = False
  mask[2, :5] = False
  tokens[~mask] = 0
  return tokens[:b], mask[:b]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(hf_models, family):
  path, ref = hf_models[family]
  model, params = ftjax.load_pretrained(path)
  tokens, mask = left_padded_prompts(np.random.default_rng(0))
  with torch.no_grad():
    hf_out = ref.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                          attention_mask=torch.tensor(mask.astype(np.int64)), do_sample=False,
                          max_new_tokens=20, min_new_tokens=20, pad_token_id=0,
                          eos_token_id=None).numpy()[:, tokens.shape[1]:]
  out = ftjax.generate(model, params, tokens, mask, max_new_tokens=20)
  np.testing.assert_array_equal(np.asarray(out.tokens), hf_out)
  assert np.asarray(out.mask).all()


def sequence_logprobs(model, params, prompt, prompt_mask, new_tokens, temperature=1.0):
  """Training-forward logprobs of new_tokens given the left-padded prompt, from the logits
  divided by `temperature` (the distribution the sampler drew them from)."""
  seq = np.concatenate([prompt, new_tokens], axis=1)
  mask = np.concatenate([prompt_mask, np.ones_like(new_tokens, bool)], axis=1)
  logits = model.apply({"params": params}, seq, mask=mask)
  lp = jax.nn.log_softmax(logits[:, prompt.shape[1] - 1:-1] / temperature, axis=-1)
  return np.asarray(jnp.take_along_axis(lp, jnp.asarray(new_tokens)[..., None], -1)[..., 0])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sampled_logprobs_equal_training_forward(hf_models, family):
  model, params = ftjax.load_pretrained(hf_models[family][0])
  tokens, mask = left_padded_prompts(np.random.default_rng(1))
  out = ftjax.generate(model, params, tokens, mask, max_new_tokens=12, temperature=1.3, top_k=50,
                       top_p=0.9, rng=jax.random.PRNGKey(3), bucket=False)
  # Tempered: the distribution actually sampled from (TRL divides by the temperature too);
  # top-k/top-p are not folded in, as in TRL's trainer.
  ref = sequence_logprobs(model, params, tokens, mask, np.asarray(out.tokens), temperature=1.3)
  np.testing.assert_allclose(np.asarray(out.logprobs), ref, atol=1e-5)
  raw = sequence_logprobs(model, params, tokens, mask, np.asarray(out.tokens))
  assert np.abs(np.asarray(out.logprobs) - raw).max() > 1e-2  # not the untempered ones


def test_eos_stops_each_sequence(hf_models):
  model, params = ftjax.load_pretrained(hf_models["qwen2"][0])
  tokens, mask = left_padded_prompts(np.random.default_rng(2))
  free = np.asarray(ftjax.generate(model, params, tokens, mask, max_new_tokens=10).tokens)
  # Use the token greedy emits at step 3 of row 0 as EOS: row 0 must stop right there.
  eos = int(free[0, 3])
  out = ftjax.generate(model, params, tokens, mask, max_new_tokens=10, eos_id=[eos, 10_000],
                       pad_id=0)
  toks, m, lp = map(np.asarray, (out.tokens, out.mask, out.logprobs))
  for row in range(toks.shape[0]):
    hits = np.where(free[row] == eos)[0]
    stop = hits[0] if len(hits) else 10
    assert m[row, :stop + 1].all() and not m[row, stop + 1:].any()
    np.testing.assert_array_equal(toks[row, :stop + 1], free[row, :stop + 1])
    assert (toks[row, stop + 1:] == 0).all() and (lp[row, stop + 1:] == 0).all()


def test_n_samples_and_seeds(hf_models):
  model, params = ftjax.load_pretrained(hf_models["llama"][0])
  tokens, mask = left_padded_prompts(np.random.default_rng(3), b=2)
  out = ftjax.generate(model, params, tokens, mask, max_new_tokens=8, temperature=1.0,
                       n_samples=4, rng=jax.random.PRNGKey(0))
  toks = np.asarray(out.tokens)
  assert toks.shape == (8, 8)
  assert len({tuple(r) for r in toks[:4]}) > 1  # samples of one prompt differ
  # Each sample's logprobs equal the forward on its own prompt.
  ref = sequence_logprobs(model, params, np.repeat(tokens, 4, 0), np.repeat(mask, 4, 0), toks)
  np.testing.assert_allclose(np.asarray(out.logprobs), ref, atol=1e-5)
  again = ftjax.generate(model, params, tokens, mask, max_new_tokens=8, temperature=1.0,
                         n_samples=4, rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(again.tokens), toks)


def test_top_k_one_and_tiny_top_p_are_greedy(hf_models):
  model, params = ftjax.load_pretrained(hf_models["gemma"][0])
  tokens, mask = left_padded_prompts(np.random.default_rng(4))
  greedy = np.asarray(ftjax.generate(model, params, tokens, mask, max_new_tokens=6).tokens)
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    out = ftjax.generate(model, params, tokens, mask, max_new_tokens=6, temperature=2.0,
                         rng=jax.random.PRNGKey(7), **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy)


def test_top_k_top_p_filtering_distribution():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  top_k2 = np.asarray(jax.vmap(lambda k: sampling.sample_logits(logits, k, 1.0, 2, 1.0))(keys))
  assert set(np.unique(top_k2)) == {0, 1}
  # top_p=0.7 keeps {0.5, 0.3}: the smallest set whose mass reaches 0.7.
  top_p = np.asarray(jax.vmap(lambda k: sampling.sample_logits(logits, k, 1.0, 0, 0.7))(keys))
  assert set(np.unique(top_p)) == {0, 1}
  assert abs((top_p == 0).mean() - 0.5 / 0.8) < 0.03


def test_prompt_lengths_share_compilations(hf_models):
  model, params = ftjax.load_pretrained(hf_models["llama"][0])
  rng = np.random.default_rng(5)
  sampling._generate.clear_cache()
  for t in (3, 5, 9, 16):
    ftjax.generate(model, params, rng.integers(6, 320, (2, t)), max_new_tokens=4)
  assert sampling._generate._cache_size() == 1  # all bucket to 16
  assert sampling.bucket_length(17) == 32 and sampling.bucket_length(600) == 1024


def test_bad_prompts():
  cfg = ftjax.get_preset("tiny")
  model = ftjax.Decoder(cfg)
  params = ftjax.init_params(model, jax.random.PRNGKey(0))
  mask = np.array([[True, True, False]])
  with pytest.raises(ValueError, match="left-padded"):
    ftjax.generate(model, params, np.ones((1, 3), int), mask)
  with pytest.raises(ValueError, match="top_p"):
    ftjax.generate(model, params, np.ones((1, 3), int), top_p=0.0)
