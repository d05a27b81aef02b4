"""RLOO advantages and loss (Ahmadian et al. 2024), after TRL 1.16's RLOOTrainer.

Advantages from `_generate_and_score_completions`: unscorable completions (NaN) stay out of the
baseline, rewards are clipped (`reward_clip_range`), the KL penalty goes into the reward (beta
times the sequence's summed first-order log ratio old - ref, not GRPO's per-token k3 in the
loss), each completion's baseline is the mean reward of the other scorable samples of its
prompt, and `normalize_advantages` whitens over the batch. The loss from `_compute_loss`: one
importance ratio per sequence from its summed token logps, PPO-clipped, mean over sequences.
The loss is returned as (sum, count) so the GRPO step divides once over micro-batches and
devices, as for the GRPO family.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from ftjax.losses.grpo import _nanstd


def rloo_advantages(rewards: jax.Array, group_size: int, *, normalize_advantages: bool = False,
                    kl: Optional[jax.Array] = None, beta: float = 0.0,
                    reward_clip_range: Optional[Sequence[float]] = None
                    ) -> tuple[jax.Array, jax.Array]:
  """Leave-one-out advantages: r_i - mean of the other scorable r_j of its prompt.

  Args:
    rewards: float [N] total rewards, N = prompts * group_size, grouped (row b * G + j);
      NaN marks an unscorable completion: out of its siblings' baselines, advantage 0.
    kl: float [N] summed (old - ref) logps over each completion's tokens; with beta != 0 the
      reward becomes r - beta * kl (TRL's reward-side KL).
    reward_clip_range: (min, max) applied to the rewards before the KL penalty.
  Returns:
    (advantages float32 [N], std_is_zero bool [N]: the group's reward std (after the KL term)
     is 0, TRL's `frac_reward_zero_std`).
  """
  r = rewards.astype(jnp.float32)
  if reward_clip_range:
    r = jnp.clip(r, reward_clip_range[0], reward_clip_range[1])
  if beta != 0.0:
    r = r - beta * kl.astype(jnp.float32)
  grouped = r.reshape(-1, group_size)  # [B, G]
  if group_size > 1:
    std = _nanstd(grouped, axis=1)
    count = jnp.sum(~jnp.isnan(grouped), axis=1, keepdims=True)
    total = jnp.nansum(grouped, axis=1, keepdims=True)
    # A lone scorable sample divides 0 by 0: NaN, zeroed below as TRL's nan_to_num does.
    adv = (grouped - (total - grouped) / (count - 1)).reshape(-1)
    # A group of equal rewards carries no signal: exactly 0 (float32 rounding of the others'
    # sum would otherwise give its samples a ~1e-8 nudge), as for GRPO's advantages. NaN ones
    # (unscorable, or a lone scorable sample) stay NaN: out of the normalisation, as in TRL.
    flat = jnp.repeat(jnp.nanmin(grouped, axis=1) == jnp.nanmax(grouped, axis=1), group_size)
    adv = jnp.where(flat & ~jnp.isnan(adv), 0.0, adv)
  else:  # TRL: only its eval can have one sample (training refuses it); advantages 0
    std = jnp.zeros(grouped.shape[0], jnp.float32)
    adv = jnp.zeros_like(r)
  if normalize_advantages:
    adv = (adv - jnp.nanmean(adv)) / (_nanstd(adv) + 1e-4)
  zero = jnp.repeat(jnp.isclose(std, 0.0), group_size)
  return jnp.nan_to_num(adv, nan=0.0), zero


def rloo_loss_sum(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array,
                  mask: jax.Array, *, epsilon_low: float = 0.2,
                  epsilon_high: Optional[float] = None) -> tuple[jax.Array, jax.Array, dict]:
  """TRL's RLOO loss as (sum, count); the batch loss is sum / count.

  ratio = exp(sum_t mask * (logp - old_logp)), one per sequence;
  loss = mean over sequences of -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A).

  Args:
    logps, old_logps: float [N, M] of the completion tokens (current params; at sampling time).
    advantages: float [N]. mask: bool or float [N, M] (a row with no tokens has ratio 1 and
      still counts in the mean, as in TRL).
  Returns:
    (loss_sum, N as float32, aux with "ratio", "low_clipped", "high_clipped" float [N, 1]).
  """
  eps_high = epsilon_low if epsilon_high is None else epsilon_high
  m = mask.astype(jnp.float32)
  # Summed per sequence before the difference, as TRL: its old logps arrive summed.
  log_ratio = (logps * m).sum(-1, keepdims=True) - (old_logps * m).sum(-1, keepdims=True)
  ratio = jnp.exp(log_ratio)  # [N, 1]
  adv = advantages.astype(jnp.float32)[:, None]
  clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + eps_high)
  per_seq = -jnp.minimum(ratio * adv, clipped * adv)
  aux = {"ratio": ratio,
         "low_clipped": ((ratio < 1 - epsilon_low) & (adv < 0)).astype(jnp.float32),
         "high_clipped": ((ratio > 1 + eps_high) & (adv > 0)).astype(jnp.float32)}
  return per_seq.sum(), jnp.asarray(per_seq.shape[0], jnp.float32), aux


def sequence_kl(old_logps: jax.Array, ref_logps: jax.Array, mask: jax.Array) -> jax.Array:
  """float [N]: TRL RLOO's KL per completion, the summed first-order log ratio old - ref (may be
  negative per token, unlike GRPO's k3)."""
  return ((old_logps - ref_logps) * mask.astype(jnp.float32)).sum(-1)
