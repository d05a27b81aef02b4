"""Rollouts: the sampler's logprobs equal the one training logprob function on the generated
sequences (LoRA, QLoRA, prefix, prompt tuning, n > 1, EOS, temperature), pad == eos."""

import jax
import numpy as np
import pytest

import ftjax
from ftjax import lora, rollout
from ftjax.tokenizer import train_bpe_tokenizer


def _perturb(params, scale=0.05, seed=0):
  """Non-zero adapters (LoRA B starts at 0, prefixes small) so they change the samples."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  key = jax.random.PRNGKey(seed)
  out = {}
  for i, (path, x) in enumerate(flat):
    names = [getattr(p, "key", "") for p in path]
    if any(n in ("lora_b", "lora_a", "prefix", "prompt") for n in names) and x.dtype.kind == "f":
      x = x + scale * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    out[tuple(names)] = x
  from flax import traverse_util
  return traverse_util.unflatten_dict(out)


def _prompts(rng):
  return [list(rng.integers(6, 320, n)) for n in (5, 9, 3)]


LOADS = {
    "lora": dict(lora=ftjax.LoraConfig(rank=4)),
    "qlora_nf4": dict(lora=ftjax.LoraConfig(rank=4), quant="nf4"),
    "prefix": dict(prefix=ftjax.PrefixConfig(kind="prefix", length=3)),
    "prompt": dict(prefix=ftjax.PrefixConfig(kind="prompt", length=3)),
}


@pytest.mark.parametrize("kind", list(LOADS))
def test_sampler_logprobs_equal_completion_logprobs(hf_models, kind):
  model, params = ftjax.load_pretrained(hf_models["llama"][0], **LOADS[kind])
  params = _perturb(params)
  rng = np.random.default_rng(0)
  # An EOS that greedy emits early in one row, so some completions stop and some do not.
  free = rollout.rollout(model, params, _prompts(rng), n_samples=1, max_new_tokens=10,
                         rng=jax.random.PRNGKey(0), temperature=0.0, prompt_len=12)
  eos = (int(free["completion_tokens"][0, 2]),)
  ro = rollout.rollout(model, params, _prompts(np.random.default_rng(0)), n_samples=4,
                       max_new_tokens=10, rng=jax.random.PRNGKey(1), temperature=0.7,
                       eos_ids=eos, pad_id=0, prompt_len=12)
  assert ro["completion_tokens"].shape == (12, 10) and ro["prompt_tokens"].shape == (12, 12)
  np.testing.assert_array_equal(ro["group"], np.repeat(np.arange(3), 4))
  lp = np.asarray(rollout.make_logprob_fn(model, temperature=0.7, chunk=4)(params, ro))
  np.testing.assert_allclose(ro["logprobs"], lp, atol=1e-5)
  assert (lp[~ro["completion_mask"]] == 0).all()
  # The adapters matter: with them off, the same tokens get other logprobs.
  off = np.asarray(rollout.make_logprob_fn(lora.disable(model), temperature=0.7)(params, ro))
  assert np.abs(off - lp).max() > 1e-3
  # Termination comes from the sampler's mask: a row that emitted the EOS is terminated and
  # its mask ends right there.
  for i in range(12):
    hit = np.where(ro["completion_tokens"][i] == eos[0])[0]
    m = ro["completion_mask"][i]
    if len(hit) and m[hit[0]]:
      assert ro["terminated"][i] and m.sum() == hit[0] + 1
    else:
      assert not ro["terminated"][i] and m.all()
  # And the value-head path: hidden states at the positions that predict each token.
  lp2, hidden = rollout.completion_logprobs(model, params, ro, temperature=0.7,
                                            return_hidden=True)
  assert hidden.shape == (12, 10, model.cfg.d_model)
  np.testing.assert_allclose(np.asarray(lp2), lp, atol=1e-5)


def test_pad_equal_to_eos_keeps_the_real_eos(hf_models, tmp_path):
  """pad == eos: the filler after the end is the EOS id, yet only the first is counted."""
  model, params = ftjax.load_pretrained(hf_models["llama"][0])
  prompts = _prompts(np.random.default_rng(3))
  free = rollout.rollout(model, params, prompts, n_samples=1, max_new_tokens=8,
                         rng=jax.random.PRNGKey(0), temperature=1.0)
  row = [int(x) for x in free["completion_tokens"][0]]
  j = next(j for j in range(1, 8) if row[j] not in row[:j])  # first stop after >= 1 token
  eos = row[j]
  ro = rollout.rollout(model, params, prompts, n_samples=1, max_new_tokens=8,
                       rng=jax.random.PRNGKey(0), temperature=1.0, eos_ids=(eos,), pad_id=eos)
  assert ro["terminated"][0] and ro["completion_mask"][0].sum() == j + 1
  assert (ro["completion_tokens"][0, j + 1:] == eos).all()  # filler == eos, outside the mask
  assert rollout.completion_ids(ro)[0] == row[:j + 1]


def test_eos_ids_from_tokenizer_and_generation_config(hf_models, tmp_path):
  d = str(tmp_path / "tok")
  tok = train_bpe_tokenizer(["1+2=3", "hello"] * 10, 300, d)
  model, _ = ftjax.load_pretrained(hf_models["llama"][0])
  model = model.clone(cfg=model.cfg.replace(eos_token_id=(7, 9)))
  assert rollout.eos_ids(tok, model) == (tok.eos_token_id, 7, 9)
  assert rollout.pad_id(tok) == tok.pad_token_id
  tokens, mask = rollout.left_pad([[5, 6, 7], [8]], 0, 2)  # truncated from the left, as TRL
  np.testing.assert_array_equal(tokens, [[6, 7], [0, 8]])
  np.testing.assert_array_equal(mask, [[True, True], [False, True]])
  # Filler rows up to a fixed batch: one unmasked pad token each (the sampler's last column).
  tokens, mask = rollout.left_pad([[5, 6, 7]], 4, rows=3)
  assert tokens.shape == (3, 16) and (tokens[:, :-3] == 4).all() and (tokens[1:] == 4).all()
  np.testing.assert_array_equal(mask.sum(1), [3, 1, 1])
  assert mask[:, -1].all()
