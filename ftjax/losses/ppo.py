"""PPO losses: per-token rewards, GAE, whitening, clipped policy and value losses, KL control.

PPO (RLHF with a learned value function), after TRL's PPOTrainer and PPOConfig names:
trl v0.19.0 (5b3ea9dd43b526f188ef8f63ca16bbe977ec8603) trl/trainer/ppo_trainer.py (rewards,
GAE, clipped losses, metrics) and trl/core.py (masked_mean, masked_var, masked_whiten); the
adaptive KL controller from trl v0.11.0 (e4935e13fcda106485ed5c85678c6f0bb0d1d10b)
trl/trainer/utils.py `AdaptiveKLController` (Ziegler et al. 2019), dropped from later TRL.
Completions are right-padded, so `mask` [B, M] is a prefix of True (EOS included) per row.

One deliberate difference: TRL adds the score at index `sequence_length + 1` (one past the
EOS when that fits) and keeps values and value targets one token past the EOS
(`padding_mask_p1`). Here the score lands on the last completion token and rewards, values,
GAE and the value loss all stop at the completion mask, so nothing is learned from the state
after the episode ended. Tests compare each formula with TRL's on the same tensors.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k3")


def kl_penalty(logps: jax.Array, ref_logps: jax.Array, estimator: str = "k1") -> jax.Array:
  """Per-token KL(policy || reference) estimate (http://joschu.net/blog/kl-approx.html).

  With logr = ref - policy: "k1" = -logr (unbiased, can be negative), "k3" = exp(logr) - 1 -
  logr (unbiased, >= 0, lower variance). TRL PPOConfig.kl_estimator.

  Args:
    logps, ref_logps: float [B, M] log-probs of the sampled tokens.
  Returns:
    float32 [B, M].
  """
  logr = ref_logps.astype(jnp.float32) - logps.astype(jnp.float32)
  if estimator == "k1":
    return -logr
  if estimator == "k3":
    return jnp.expm1(logr) - logr
  raise ValueError(f"unknown kl_estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def last_index(mask: jax.Array) -> jax.Array:
  """Index of the last True of each row of a prefix mask [B, M] -> int32 [B] (0 if none)."""
  return jnp.maximum(mask.astype(jnp.int32).sum(-1) - 1, 0)


def ppo_rewards(logps: jax.Array, ref_logps: jax.Array, scores: jax.Array, mask: jax.Array,
                kl_coef: jax.Array | float, estimator: str = "k1"
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token rewards: -kl_coef * KL on every completion token, plus the score on the last.

  Args:
    logps, ref_logps: float [B, M] behaviour-policy and reference log-probs of the completion.
    scores: float [B] sequence scores (reward model, missing-EOS penalty already applied).
    mask: bool [B, M], True on completion tokens (a prefix of each row).
    kl_coef: scalar (a traced array under the adaptive controller).
  Returns:
    (rewards, kl, non_score_rewards), float32 [B, M] each, 0 outside the mask.
  """
  m = mask.astype(bool)
  kl = jnp.where(m, kl_penalty(logps, ref_logps, estimator), 0.0)
  non_score = -jnp.asarray(kl_coef, jnp.float32) * kl
  at_end = jax.nn.one_hot(last_index(m), m.shape[1], dtype=jnp.float32)
  at_end = at_end * m.any(-1, keepdims=True)  # an empty completion gets no score
  rewards = non_score + at_end * scores.astype(jnp.float32)[:, None]
  return rewards, kl, non_score


def apply_missing_eos_penalty(scores: jax.Array, terminated: jax.Array,
                              penalty: Optional[float]) -> jax.Array:
  """TRL's `missing_eos_penalty`: subtract `penalty` from the score of each completion that did
  not end with an EOS token (hit the length limit). scores float [B], terminated bool [B]."""
  if penalty is None:
    return scores
  return jnp.where(terminated, scores, scores - penalty)


def masked_mean(values: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Mean over the True positions of `mask` (TRL core.masked_mean)."""
  m = mask.astype(values.dtype)
  return (values * m).sum(axis=axis) / m.sum(axis=axis)


def masked_var(values: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
  """Variance over the True positions of `mask`, Bessel-corrected as TRL core.masked_var."""
  centered = values - masked_mean(values, mask)
  var = masked_mean(centered ** 2, mask)
  if unbiased:
    n = mask.astype(values.dtype).sum()
    var = var * n / (n - 1)
  return var


def masked_whiten(values: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
  """(x - mean) / sqrt(var + 1e-8) over the masked positions (TRL core.masked_whiten); with
  `shift_mean=False` the mean is added back (only the scale changes). Returns every position:
  zero the unmasked ones outside, as TRL does."""
  mean, var = masked_mean(values, mask), masked_var(values, mask)
  whitened = (values - mean) * jax.lax.rsqrt(var + 1e-8)
  return whitened if shift_mean else whitened + mean


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al. 2016) over the completion tokens only.

  delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t;  A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}
  so the episode ends at the last masked token (no bootstrap from the state after EOS).

  Args:
    rewards, values: float [B, M] (`values[:, t]` is V of the state before completion token t).
    mask: bool [B, M] completion mask.
  Returns:
    (advantages, returns = advantages + values), float32 [B, M], 0 outside the mask.
  """
  m = mask.astype(jnp.float32)
  r = rewards.astype(jnp.float32) * m
  v = values.astype(jnp.float32) * m
  next_v = jnp.pad(v[:, 1:], ((0, 0), (0, 1)))
  next_m = jnp.pad(m[:, 1:], ((0, 0), (0, 1)))
  delta = r + gamma * next_v - v  # [B, M]

  def back(carry, xs):
    d, nm = xs
    a = d + gamma * lam * nm * carry
    return a, a

  _, adv = jax.lax.scan(back, jnp.zeros(r.shape[0], jnp.float32),
                        (delta.T, next_m.T), reverse=True)  # scan over M
  adv = adv.T * m
  return adv, (adv + v) * m


def ppo_policy_losses(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array,
                      cliprange: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Clipped surrogate per token: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

  Args:
    logps: float [B, M] current policy; old_logps: [B, M] behaviour policy (no gradient);
    advantages: [B, M] (whitened).
  Returns:
    (losses, clipped, ratio), float32 [B, M] each; `clipped` is 1 where the clipped term is the
    larger one (TRL pg_clipfrac); average the losses over the completion mask outside.
  """
  diff = logps.astype(jnp.float32) - jax.lax.stop_gradient(old_logps.astype(jnp.float32))
  ratio = jnp.exp(diff)
  adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
  l1 = -adv * ratio
  l2 = -adv * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
  return jnp.maximum(l1, l2), (l2 > l1).astype(jnp.float32), ratio


def ppo_value_losses(vpred: jax.Array, old_values: jax.Array, returns: jax.Array,
                     cliprange_value: float) -> tuple[jax.Array, jax.Array]:
  """Clipped value loss per token: 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2).

  Args:
    vpred: float [B, M] current values; old_values, returns: [B, M] from the rollout.
  Returns:
    (losses, clipped), float32 [B, M]; multiply by `vf_coef` and average over the mask outside.
  """
  v = vpred.astype(jnp.float32)
  old = jax.lax.stop_gradient(old_values.astype(jnp.float32))
  ret = jax.lax.stop_gradient(returns.astype(jnp.float32))
  v_clip = jnp.clip(v, old - cliprange_value, old + cliprange_value)
  l1, l2 = jnp.square(v - ret), jnp.square(v_clip - ret)
  return 0.5 * jnp.maximum(l1, l2), (l2 > l1).astype(jnp.float32)


def adaptive_kl_update(kl_coef, current_kl, n_steps, target: float, horizon: float):
  """Ziegler et al.'s proportional KL controller (TRL AdaptiveKLController.update):
  kl_coef * (1 + clip(current / target - 1, -0.2, 0.2) * n_steps / horizon).

  Works on floats and traced scalars alike; `n_steps` is the number of episodes in the batch.
  """
  err = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
  return kl_coef * (1.0 + err * n_steps / horizon)
