"""KV-cache sampler: jitted prefill, then a `lax.while_loop` decode.

Greedy (temperature 0), temperature, top-k and top-p; per-sequence stop on one or more EOS
ids; n samples per prompt (the prompt is prefilled once and its cache repeated). Logprobs are
those of the tempered distribution the tokens are drawn from before truncation:
log_softmax(logits / temperature) (the raw logits at temperature 0), after temperature but
before top-k or top-p, so they equal `rollout.completion_logprobs` at the same temperature (as
TRL computes them) and, at temperature 1, the training forward's token logprobs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.model import Decoder, init_cache, prompt_length


class GenerateOutput(NamedTuple):
  tokens: jax.Array  # int32 [B * n, M]; pad_id after EOS
  logprobs: jax.Array  # float32 [B * n, M]; 0 after EOS
  mask: jax.Array  # bool [B * n, M]; True up to and including the EOS token


def bucket_length(t: int, minimum: int = 16) -> int:
  """Prompt length rounded up (powers of two, then multiples of 512) to bound recompiles."""
  if t <= 512:
    return max(minimum, 1 << max(0, (t - 1).bit_length()))
  return -(-t // 512) * 512


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
  """Pick one token per row. logits [B, V] float32 -> int32 [B]."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
    logits = jnp.full_like(logits, -jnp.inf).at[
        jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "eos_ids", "n", "pad_id"))
def _generate(params, tokens, mask, rng, rows, *, model: Decoder, max_new_tokens: int,
              temperature: float, top_k: int, top_p: float, eos_ids: tuple, n: int, pad_id: int):
  b, t = tokens.shape
  m = max_new_tokens
  cache = init_cache(model.cfg, b, t + m + prompt_length(model))
  logits, cache = model.apply({"params": params}, tokens, mask=mask, cache=cache,
                              adapter_rows=rows)
  logits = logits[:, -1]  # [B, V]; prompts are left-padded, so the last slot is the last token
  if n > 1:
    rep = lambda x, axis=0: jnp.repeat(x, n, axis=axis)
    # k, v [L, B, S, K, H] repeat along B; the mask [B, S] along its first axis.
    logits = rep(logits)
    cache = {**cache, "k": rep(cache["k"], 1), "v": rep(cache["v"], 1), "mask": rep(cache["mask"])}
    rows = None if rows is None else rep(rows)
  bn = b * n
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

  def cond(state):
    i, _, _, done, *_ = state
    return (i < m) & ~jnp.all(done)

  def body(state):
    i, logits, cache, done, out_tok, out_lp, out_mask, key = state
    key, sub = jax.random.split(key)
    tok = sample_logits(logits, sub, temperature, top_k, top_p)
    scaled = logits / temperature if temperature > 0 else logits  # see the module docstring
    lp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tok[:, None], axis=-1)[:, 0]
    out_tok = out_tok.at[:, i].set(jnp.where(done, pad_id, tok))
    out_lp = out_lp.at[:, i].set(jnp.where(done, 0.0, lp))
    out_mask = out_mask.at[:, i].set(~done)
    done = done | jnp.isin(tok, eos)
    logits, cache = model.apply({"params": params}, tok[:, None], cache=cache, decode=True,
                                adapter_rows=rows)
    return i + 1, logits[:, -1], cache, done, out_tok, out_lp, out_mask, key

  state = (jnp.zeros((), jnp.int32), logits, cache, jnp.zeros((bn,), bool),
           jnp.full((bn, m), pad_id, jnp.int32), jnp.zeros((bn, m), jnp.float32),
           jnp.zeros((bn, m), bool), rng)
  _, _, _, _, out_tok, out_lp, out_mask, _ = jax.lax.while_loop(cond, body, state)
  return GenerateOutput(out_tok, out_lp, out_mask)


def generate(model: Decoder, params: dict, prompt_tokens, prompt_mask=None,
             max_new_tokens: int = 32, rng: Optional[jax.Array] = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: Union[None, int, Sequence[int]] = None, n_samples: int = 1,
             pad_id: int = 0, bucket: bool = True, adapter_rows=None) -> GenerateOutput:
  """Sample continuations of left-padded prompts.

  Args:
    prompt_tokens: int [B, T], left-padded.
    prompt_mask: bool [B, T], False on padding (default: all True).
    eos_id: one id or several; a sequence stops after emitting any of them.
    n_samples: samples per prompt; outputs are grouped per prompt (row b * n + j).
    bucket: left-pad T up to `bucket_length(T)` so that new prompt lengths reuse compilations.
    adapter_rows: int [B], each prompt's adapter under AdapterSpec.multi (-1: none; adapters.py).
  Returns:
    GenerateOutput(tokens [B*n, M] int32, logprobs [B*n, M] float32, mask [B*n, M] bool);
    logprobs are log_softmax(logits / temperature) of the sampled tokens (raw at temperature
    0), before top-k/top-p (see the module docstring).
  """
  tokens = np.asarray(prompt_tokens, np.int32)
  mask = np.ones(tokens.shape, bool) if prompt_mask is None else np.asarray(prompt_mask, bool)
  if tokens.ndim != 2 or mask.shape != tokens.shape:
    raise ValueError(f"generate: prompt_tokens {tokens.shape} and prompt_mask {mask.shape} must "
                     "both be [batch, length]")
  if mask.shape[1] and not mask[:, -1].all():
    raise ValueError("generate: prompts must be left-padded (prompt_mask[:, -1] must be True)")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f"generate: bad sampling settings temperature={temperature} top_k={top_k} "
                     f"top_p={top_p}")
  if bucket:
    pad = bucket_length(tokens.shape[1]) - tokens.shape[1]
    tokens = np.pad(tokens, ((0, 0), (pad, 0)), constant_values=pad_id)
    mask = np.pad(mask, ((0, 0), (pad, 0)), constant_values=False)
  eos_ids = () if eos_id is None else (
      (int(eos_id),) if np.isscalar(eos_id) else tuple(int(e) for e in eos_id))
  rng = jax.random.PRNGKey(0) if rng is None else rng
  rows = None if adapter_rows is None else jnp.asarray(adapter_rows, jnp.int32)
  return _generate(params, jnp.asarray(tokens), jnp.asarray(mask), rng, rows, model=model,
                   max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                   top_k=int(top_k), top_p=float(top_p), eos_ids=eos_ids, n=int(n_samples),
                   pad_id=int(pad_id))
