"""Losses: small pure functions with shape-annotated docstrings, picked by name.

Shapes use the letters of `model.py` (B batch, T length, V vocab).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position.

  Args:
    logits: float [B, T, V] (any float dtype; computed in float32).
    targets: int [B, T].
  Returns:
    float32 [B, T].
  """
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def sft_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
  """Masked next-token cross-entropy, as a sum and a token count (normalise outside).

  Returning the sum lets gradient accumulation divide by the total number of target tokens
  across micro-batches, which makes k micro-batches equal one batch k times larger.

  Args:
    logits: float [B, T, V]; targets: int [B, T]; weights: float [B, T] (0 on non-targets).
  Returns:
    (sum of -log p over weighted tokens, sum of weights), both float32 scalars.
  """
  w = weights.astype(jnp.float32)
  return -(token_logprobs(logits, targets) * w).sum(), w.sum()


LOSSES = {"sft": sft_loss}
