"""GRPO losses and advantages.

The GRPO family (GRPO, GSPO, DAPO, Dr. GRPO), after TRL 1.16's GRPOTrainer: advantages from
`_generate_and_score_completions` (sum_then_normalize), the per-token loss and its aggregation
from `_compute_loss`. Differences, on purpose: the aggregation is returned as (sum, count) so
a trainer divides once over micro-batches and devices; "bnpo" and "dapo" both normalise by
the completion tokens of the whole batch (TRL's bnpo by each micro-batch's own tokens, equal
without gradient accumulation).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def _nanstd(x: jax.Array, axis=None) -> jax.Array:
  """Bessel-corrected std ignoring NaN (TRL's `nanstd`); NaN with fewer than two values."""
  mean = jnp.nanmean(x, axis=axis, keepdims=True)
  var = jnp.nanmean((x - mean) ** 2, axis=axis)
  count = jnp.sum(~jnp.isnan(x), axis=axis)
  return jnp.sqrt(jnp.where(count > 1, var * count / jnp.maximum(count - 1, 1), jnp.nan))


def grpo_advantages(rewards: jax.Array, group_size: int, scale_rewards: str = "group",
                    eps: float = 1e-4) -> tuple[jax.Array, jax.Array]:
  """(r - mean of its group) / (std + eps), per completion.

  Args:
    rewards: float [N] total rewards, N = prompts * group_size, grouped (row b * G + j);
      NaN marks an unscorable completion: left out of its group's statistics, advantage 0.
    scale_rewards: "group" (std of the group), "batch" (std of the whole batch) or "none"
      (no division; the group std still feeds `std_is_zero`).
    eps: TRL's 1e-4.
  Returns:
    (advantages float32 [N], std_is_zero bool [N]: the std used (group std for "none") is 0,
     TRL's `frac_reward_zero_std` counts these).
  """
  if scale_rewards not in SCALE_REWARDS:
    raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {SCALE_REWARDS}")
  r = rewards.astype(jnp.float32)
  grouped = r.reshape(-1, group_size)  # [B, G]
  mean = jnp.repeat(jnp.nanmean(grouped, axis=1), group_size)
  if scale_rewards == "batch":
    std = jnp.broadcast_to(_nanstd(r) if r.size > 1 else jnp.zeros(()), r.shape)
  elif group_size > 1:
    std = jnp.repeat(_nanstd(grouped, axis=1), group_size)
  else:
    std = jnp.zeros_like(r)
  adv = r - mean
  if scale_rewards != "none":
    adv = adv / (std + eps)
  # A group of equal rewards carries no signal: its advantages are exactly 0 (float32 rounding
  # of its mean would otherwise give every completion the same ~1e-4 nudge, all one sign) and
  # it counts in frac_reward_zero_std, as TRL's exact torch mean and std make it.
  lo, hi = jnp.nanmin(grouped, axis=1), jnp.nanmax(grouped, axis=1)
  flat = jnp.repeat(lo == hi, group_size)
  zero = jnp.isclose(std, 0.0)
  if scale_rewards != "batch":  # the std is the group's
    zero = zero | flat
  adv = jnp.where(flat, 0.0, adv)
  return jnp.nan_to_num(adv, nan=0.0), zero


def grpo_per_token_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array,
                        mask: jax.Array, ref_logps: Optional[jax.Array] = None, *,
                        beta: float = 0.0, epsilon_low: float = 0.2,
                        epsilon_high: Optional[float] = None,
                        importance_sampling_level: str = "token", delta: Optional[float] = None
                        ) -> tuple[jax.Array, dict]:
  """Clipped surrogate plus k3 KL per token (TRL `_compute_loss`, loss_type grpo|bnpo|dr_grpo|dapo).

  ratio = exp(logp - old_logp) per token, or for importance_sampling_level="sequence" (GSPO)
  exp(masked mean over the sequence of logp - old_logp), one per sequence;
  loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3,
  k3 = exp(ref - logp) - (ref - logp) - 1 >= 0.

  Args:
    logps, old_logps: float [N, M] of the completion tokens (current params; at sampling time).
    advantages: float [N]. mask: bool or float [N, M].
    ref_logps: float [N, M], needed when beta != 0.
    delta: optional upper bound on the unclipped ratio (TRL's two-sided clipping).
  Returns:
    (per-token loss float32 [N, M] (broadcast from [N, 1] at sequence level), aux with
     "kl" [N, M] (None when beta == 0), "ratio" [N, M] or [N, 1], "low_clipped",
     "high_clipped" (same shape as ratio, float)).
  """
  eps_high = epsilon_low if epsilon_high is None else epsilon_high
  m = mask.astype(jnp.float32)
  log_ratio = logps - old_logps
  if importance_sampling_level == "token":
    log_w = log_ratio
  elif importance_sampling_level == "sequence":
    log_w = ((log_ratio * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0))[:, None]  # [N, 1]
  else:
    raise ValueError(f"importance_sampling_level={importance_sampling_level!r}: expected token "
                     "or sequence")
  ratio = jnp.exp(log_w)
  adv = advantages.astype(jnp.float32)[:, None]  # [N, 1]
  clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + eps_high)
  unclipped = ratio if delta is None else jnp.minimum(ratio, delta)
  per_token = -jnp.minimum(unclipped * adv, clipped * adv)
  per_token = jnp.broadcast_to(per_token, logps.shape)
  kl = None
  if beta != 0.0:
    d = ref_logps - logps
    kl = jnp.exp(d) - d - 1
    per_token = per_token + beta * kl
  # TRL counts clipping on the ratio after the delta bound.
  aux = {"kl": kl, "ratio": ratio,
         "low_clipped": ((unclipped < 1 - epsilon_low) & (adv < 0)).astype(jnp.float32),
         "high_clipped": ((unclipped > 1 + eps_high) & (adv > 0)).astype(jnp.float32)}
  return per_token, aux


def grpo_loss_sum(per_token_loss: jax.Array, mask: jax.Array, loss_type: str = "dapo",
                  max_completion_length: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
  """TRL's aggregation as (sum, count); the batch loss is sum / count.

    grpo:    per sequence, masked mean over its tokens; mean over sequences
             -> (sum of sequence means, N)
    bnpo, dapo: masked mean over all tokens -> (masked sum, tokens)
    dr_grpo: masked sum / (N * max_completion_length) -> (masked sum / M_max, N)

  Args:
    per_token_loss: float [N, M]; mask: bool or float [N, M];
    max_completion_length: dr_grpo's constant (default M).
  Returns:
    (loss_sum, count), float32 scalars.
  """
  m = mask.astype(jnp.float32)
  masked = per_token_loss * m
  n = jnp.asarray(per_token_loss.shape[0], jnp.float32)
  if loss_type == "grpo":
    return (masked.sum(-1) / jnp.maximum(m.sum(-1), 1.0)).sum(), n
  if loss_type in ("bnpo", "dapo"):
    return masked.sum(), m.sum()
  if loss_type == "dr_grpo":
    return masked.sum() / float(max_completion_length or per_token_loss.shape[1]), n
  raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {GRPO_LOSS_TYPES}")
