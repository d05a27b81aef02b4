"""Token log-probabilities from hidden states or logits, SFT cross-entropy, token entropy.

Shapes use the letters of `model.py` (B batch, T length, V vocab).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp


def logprobs_from_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position, from logits already in hand.

  Args:
    logits: float [B, T, V] (any float dtype; computed in float32).
    targets: int [B, T].
  Returns:
    float32 [B, T].
  """
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def token_logprobs(hidden: jax.Array, head: Callable[[jax.Array], jax.Array],
                   targets: jax.Array, mask: Optional[jax.Array] = None, chunk: int = 0
                   ) -> jax.Array:
  """log p(target) per position from hidden states, `chunk` positions of T at a time.

  Each chunk's logits [B, C, V] are built, reduced to [B, C] and dropped; the backward pass
  recomputes them (`jax.checkpoint`), so neither pass holds the [B, T, V] float32 logits, only
  one chunk's. The result equals `logprobs_from_logits(head(hidden), targets)` to float32
  rounding, value and gradient.

  Args:
    hidden: [B, T, D] final hidden states (`Decoder(..., return_hidden=True)`).
    head: hidden [B, C, D] -> float logits [B, C, V], e.g. `heads.lm_logits` over the params.
    targets: int [B, T].
    mask: optional bool or float [B, T]; positions where it is 0 give 0.
    chunk: positions per chunk; 0 (or >= T) computes all logits at once.
  Returns:
    float32 [B, T].
  """
  b, t = targets.shape
  piece = lambda h, y: logprobs_from_logits(head(h), y)
  if chunk <= 0 or chunk >= t:
    lp = piece(hidden, targets)
  else:
    n = -(-t // chunk)
    pad = n * chunk - t  # the padded tail is computed and dropped
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets, ((0, 0), (0, pad)))
    h = h.reshape(b, n, chunk, h.shape[-1]).swapaxes(0, 1)  # [n, B, C, D]
    y = y.reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, C]
    lp = jax.lax.map(jax.checkpoint(lambda hy: piece(*hy)), (h, y))  # [n, B, C]
    lp = lp.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
  if mask is not None:
    lp = jnp.where(mask.astype(bool), lp, 0.0)
  return lp


def sft_loss(token_logps: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masked next-token cross-entropy, as a sum and a token count (normalise outside).

  Returning the sum lets gradient accumulation divide by the total number of target tokens
  across micro-batches, which makes k micro-batches equal one batch k times larger.

  Args:
    token_logps: float [B, T] log p(target) (`token_logprobs`, `logprobs_from_logits`);
    weights: float [B, T] (0 on non-targets).
  Returns:
    (sum of -log p over weighted tokens, sum of weights), both float32 scalars.
  """
  w = weights.astype(jnp.float32)
  return -(token_logps.astype(jnp.float32) * w).sum(), w.sum()


def token_entropy(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], chunk: int = 0
                  ) -> jax.Array:
  """Entropy of the next-token distribution per position, `chunk` positions at a time.

  A metric: no gradient. hidden [B, T, D] -> float32 [B, T]."""
  def ent(h):
    logits = head(h).astype(jnp.float32)
    lp = jax.nn.log_softmax(logits, axis=-1)
    return -(jnp.exp(lp) * lp).sum(-1)
  hidden = jax.lax.stop_gradient(hidden)
  b, t = hidden.shape[:2]
  if chunk <= 0 or chunk >= t:
    return ent(hidden)
  n = -(-t // chunk)
  h = jnp.pad(hidden, ((0, 0), (0, n * chunk - t), (0, 0)))
  h = h.reshape(b, n, chunk, h.shape[-1]).swapaxes(0, 1)
  return jax.lax.map(ent, h).swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
