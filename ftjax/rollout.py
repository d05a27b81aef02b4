"""Rollouts: G samples per prompt from the params being trained (GRPO, PPO) or evaluated.

  eos = rollout.eos_ids(tok, model)
  ro = rollout.rollout(model, params, prompt_ids, n_samples=G, max_new_tokens=M, rng=key,
                       temperature=1.0, eos_ids=eos, pad_id=pad, prompt_len=128)
  texts = rollout.decode(tok, ro)             # completion texts for the reward functions
  lp_fn = rollout.make_logprob_fn(model, temperature=1.0, chunk=256)
  ref_lp = lp_fn(ref_params, ro)              # [N, M], e.g. the reference model's

`eos_ids`, `pad_id` and `left_pad` are the one EOS / pad / prompt-padding helper of everything
that samples (RL, evaluation, generate.py, preference prompts); `rollout` is the one
prompt -> pad -> sample path and `completion_logprobs` the one logprob function.
`rollout` calls `sampling.generate` on the params tree it is given: full, LoRA, QLoRA, prefix
or prompt tuning, with no merge and no copy, so the sampler always sees the current policy.
The batch dict it returns (numpy, N = B * G rows, grouped: row b * G + j is sample j of
prompt b) is the contract the RL losses read:

  prompt_tokens   int32 [N, P]   left-padded prompts (P fixed by `prompt_len`, else bucketed)
  prompt_mask     bool  [N, P]   False on padding
  completion_tokens int32 [N, M] sampled tokens; pad_id after the end
  completion_mask bool  [N, M]   True up to and including the EOS: the sampler's own mask, so
                                 pad == eos never hides the real EOS
  logprobs        float32 [N, M] behaviour logprobs, log_softmax(logits / temperature) (0 off
                                 the mask); equal to `completion_logprobs` on the same params
  terminated      bool  [N]      the completion emitted an EOS (else it hit max_new_tokens)
  group           int32 [N]      index of the prompt in the batch (b)

Shapes stay fixed across steps (a fixed `prompt_len`, a fixed M, a fixed number of prompts),
so neither the sampler nor the train step recompiles.

`completion_logprobs` is the one logprob function of the RL losses, the reference model and
PPO's value head (`return_hidden=True`): one forward over prompt + completion, the LM head
applied `chunk` positions at a time (`losses.token_logprobs`), logits divided by the sampling
temperature as TRL does, so it equals the sampler's logprobs for the same tokens.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import heads, losses, sampling


def eos_ids(tokenizer, model=None, extra: Sequence[int] = ()) -> tuple[int, ...]:
  """Every id that ends a completion: the tokenizer's EOS and the model's (config.json and
  generation_config.json, which may list several, e.g. llama-3's <|eot_id|>)."""
  ids = set(int(e) for e in extra)
  cands = [getattr(tokenizer, "eos_token_id", None)]
  if model is not None:
    cands.append(model.cfg.eos_token_id)
  for e in cands:
    if isinstance(e, int):
      ids.add(e)
    elif isinstance(e, (tuple, list)):
      ids.update(int(x) for x in e)
  return tuple(sorted(ids))


def pad_id(tokenizer) -> int:
  """The prompt/completion filler id: the tokenizer's pad, else its EOS, else 0. Masks, never
  token values, say what is padding, so pad == eos is harmless."""
  for e in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
    if isinstance(e, int):
      return e
  return 0


def left_pad(prompt_ids: Sequence[Sequence[int]], pad: int, length: Optional[int] = None,
             rows: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> left-padded int32 [B, P] and bool mask [B, P]: the one prompt padding of
  the sampler's callers (RL rollouts, evaluation, generate.py, preference prompts).

  P = `length` when given (longer prompts keep their last `length` tokens, as TRL truncates
  from the left), else `sampling.bucket_length` of the longest, so prompt lengths share
  compilations. `rows` (>= B) adds filler rows of one unmasked pad token (`generate` wants the
  last column unmasked) up to a fixed batch.
  """
  if length:
    prompt_ids = [list(x)[-length:] for x in prompt_ids]
    t = int(length)
  else:
    t = sampling.bucket_length(max(len(x) for x in prompt_ids))
  n = len(prompt_ids) if rows is None else int(rows)
  tokens = np.full((n, t), pad, np.int32)
  mask = np.zeros((n, t), bool)
  for i, x in enumerate(prompt_ids):
    if len(x):
      tokens[i, t - len(x):], mask[i, t - len(x):] = x, True
  mask[len(prompt_ids):, -1] = True
  return tokens, mask


def rollout(model, params, prompt_ids: Sequence[Sequence[int]], *, n_samples: int,
            max_new_tokens: int, rng: jax.Array, temperature: float = 1.0, top_k: int = 0,
            top_p: float = 1.0, eos_ids: Sequence[int] = (), pad_id: int = 0,
            prompt_len: Optional[int] = None, adapter_rows=None) -> dict:
  """`n_samples` completions of each prompt, sampled from `params` as they are.

  Args:
    prompt_ids: B token lists (already chat-templated); none may be empty.
    n_samples: G, completions per prompt.
    prompt_len: fixed left-padded prompt length P (None: bucketed to the longest).
    adapter_rows: int [B], each prompt's adapter under AdapterSpec.multi (adapters.py).
  Returns:
    the batch dict of the module docstring, numpy arrays with B * G rows.
  """
  if any(len(x) == 0 for x in prompt_ids):
    raise ValueError("rollout: empty prompt (every prompt needs at least one token)")
  tokens, mask = left_pad(prompt_ids, pad_id, prompt_len)
  out = sampling.generate(model, params, tokens, mask, max_new_tokens=max_new_tokens, rng=rng,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_id=tuple(eos_ids) or None, n_samples=n_samples, pad_id=pad_id,
                          bucket=False, adapter_rows=adapter_rows)
  toks, lps, keep = (np.asarray(x) for x in jax.device_get(tuple(out)))
  g = int(n_samples)
  eos = np.asarray(list(eos_ids) or [-1])
  return {
      "prompt_tokens": np.repeat(tokens, g, axis=0),
      "prompt_mask": np.repeat(mask, g, axis=0),
      "completion_tokens": toks.astype(np.int32),
      "completion_mask": keep,
      "logprobs": lps.astype(np.float32),
      # An EOS under the mask: after the end the filler may equal an EOS id, but it is unmasked.
      "terminated": (np.isin(toks, eos) & keep).any(axis=1),
      "group": np.repeat(np.arange(len(prompt_ids), dtype=np.int32), g),
  }


def decode(tokenizer, batch: dict) -> list[str]:
  """Completion texts (special tokens, EOS included, dropped), one per row."""
  toks, keep = batch["completion_tokens"], batch["completion_mask"]
  return [tokenizer.decode(toks[i][keep[i]], skip_special_tokens=True)
          for i in range(toks.shape[0])]


def completion_ids(batch: dict) -> list[list[int]]:
  """The completion token lists under the mask (TRL passes them to rewards as completion_ids)."""
  toks, keep = batch["completion_tokens"], batch["completion_mask"]
  return [toks[i][keep[i]].tolist() for i in range(toks.shape[0])]


def completion_logprobs(model, params, batch: dict, *, temperature: float = 1.0, chunk: int = 0,
                        return_hidden: bool = False, rng: Optional[jax.Array] = None):
  """log p(completion token) per position from one forward over prompt + completion.

  Args:
    batch: prompt_tokens, prompt_mask [N, P]; completion_tokens, completion_mask [N, M].
    temperature: the sampling temperature; logits are divided by it (0 or 1: raw logits).
    chunk: positions of M per LM-head chunk (`losses.token_logprobs`).
    return_hidden: also return the hidden states [N, M, D] at the positions that predict each
      completion token (PPO's value head reads them).
  Returns:
    float32 [N, M] (0 off the completion mask), and the hidden states if asked.
  """
  p = batch["prompt_tokens"].shape[1]
  tokens = jnp.concatenate([batch["prompt_tokens"], batch["completion_tokens"]], axis=1)
  mask = jnp.concatenate([batch["prompt_mask"], batch["completion_mask"]], axis=1)
  hidden = model.apply({"params": params}, tokens, mask=mask, return_hidden=True,
                       rngs=None if rng is None else {"dropout": rng})  # [N, P+M, D]
  hidden = hidden[:, p - 1:-1]  # [N, M, D]: position t predicts token t + 1
  tempered = bool(temperature) and temperature != 1.0

  def head(h):
    logits = heads.lm_logits(params, h, model.cfg)
    return logits / temperature if tempered else logits  # as the sampler: bitwise the same op
  lp = losses.token_logprobs(hidden, head, batch["completion_tokens"], batch["completion_mask"],
                             chunk)
  return (lp, hidden) if return_hidden else lp


def make_logprob_fn(model, *, temperature: float = 1.0, chunk: int = 0):
  """`fn(params, batch) -> [N, M]`: `completion_logprobs` jitted (no gradient), for the
  reference model and stored old logprobs; only the batch's four token/mask arrays are read."""
  jitted = jax.jit(functools.partial(completion_logprobs, model, temperature=temperature,
                                     chunk=chunk))
  keys = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask")

  def fn(params, batch):
    return jitted(params, {k: batch[k] for k in keys})
  return fn
