"""Losses: small pure functions with shape-annotated docstrings, picked by name.

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


LOSSES = {"sft": sft_loss}


# Preference optimisation.
#
# Formulas follow TRL's DPOTrainer. Where TRL versions differ (checked against trl 1.16.0,
# `DPOTrainer._compute_loss`, and the 0.x `DPOTrainer.dpo_loss` method):
# - "sigmoid" + label_smoothing: 0.x applies conservative DPO (cDPO); 1.x dropped it and uses
#   label_smoothing only for "robust"/"exo_pair". We keep cDPO; label_smoothing=0 matches both.
# - "ipo": 0.x averaged per-token logps before the loss (`average_log_prob=loss_type == "ipo"`,
#   later `all_logps / loss_mask.sum(-1)`), so its rewards and logps metrics are averages too;
#   1.x passes sums and divides the log-ratios by the completion length (clamped to >= 1) inside
#   the loss, which gives the same loss, but its reward metrics come from the sums.
#   Here the caller passes means for "ipo" (the loss is equal in both versions).

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def sequence_logps_sum_and_mean(token_logps: jax.Array, mask: jax.Array
                                ) -> tuple[jax.Array, jax.Array]:
  """Per-sequence sum and mean of token logprobs over masked (completion) tokens.

  The sums feed "sigmoid"/"robust"/"hinge" DPO, the means feed "ipo" (length-normalised, as TRL).

  Args:
    token_logps: float [B, T], e.g. from `token_logprobs`.
    mask: bool or float [B, T], 1 on completion tokens (prompt and padding 0).
  Returns:
    (sums, means), float32 [B] each; a row with an empty mask has mean 0 (count clamped to 1).
  """
  m = mask.astype(jnp.float32)
  sums = (token_logps.astype(jnp.float32) * m).sum(axis=-1)  # [B]
  return sums, sums / jnp.maximum(m.sum(axis=-1), 1.0)


def sequence_logps(token_logps: jax.Array, mask: jax.Array, average: bool = False) -> jax.Array:
  """log p(completion) per sequence: masked sum (or mean if `average`) of token logprobs.

  Args:
    token_logps: float [B, T]; mask: bool or float [B, T], 1 on completion tokens.
  Returns:
    float32 [B].
  """
  sums, means = sequence_logps_sum_and_mean(token_logps, mask)
  return means if average else sums


def dpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
             ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Direct preference optimisation and its variants, per pair (TRL's DPOTrainer formulas).

  With logits = (pi_c - pi_r) - (ref_c - ref_r) and eps = label_smoothing:
    "sigmoid": -logsigmoid(beta * logits) * (1 - eps) - logsigmoid(-beta * logits) * eps
               (DPO; eps > 0 is conservative DPO, cDPO).
    "robust":  (-logsigmoid(beta * logits) * (1 - eps) + logsigmoid(-beta * logits) * eps)
               / (1 - 2 * eps)  (Chowdhury et al. 2024; eps is the label flip rate, in [0, 0.5)).
    "hinge":   relu(1 - beta * logits)  (RSO; eps ignored).
    "ipo":     (logits - 1 / (2 * beta))**2  (IPO Eq. 17, beta is tau; eps ignored).

  Args:
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: float [B],
      summed completion logprobs (`sequence_logps`); for "ipo" pass the mean per-token logprobs
      instead (`sequence_logps(..., average=True)`), since TRL length-normalises IPO.
    beta: inverse temperature (KL strength); for "ipo" the regulariser tau.
    loss_type: one of `DPO_LOSS_TYPES`.
    label_smoothing: eps above; used by "sigmoid" and "robust".
  Returns:
    (losses, chosen_rewards, rejected_rewards), float32 [B] each; average the losses outside.
    rewards = beta * (policy - reference) logps per side, without gradient.
  """
  pc, pr, rc, rr = (x.astype(jnp.float32) for x in (
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
  logits = (pc - pr) - (rc - rr)  # [B]
  eps = label_smoothing
  if loss_type == "sigmoid":
    losses = (-jax.nn.log_sigmoid(beta * logits) * (1 - eps)
              - jax.nn.log_sigmoid(-beta * logits) * eps)
  elif loss_type == "robust":
    if not 0.0 <= eps < 0.5:  # TRL only warns; at 0.5 the loss divides by zero
      raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
    losses = (-jax.nn.log_sigmoid(beta * logits) * (1 - eps)
              + jax.nn.log_sigmoid(-beta * logits) * eps) / (1 - 2 * eps)
  elif loss_type == "hinge":
    losses = jax.nn.relu(1 - beta * logits)
  elif loss_type == "ipo":
    losses = (logits - 1 / (2 * beta)) ** 2
  else:
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
  chosen_rewards = beta * jax.lax.stop_gradient(pc - rc)
  rejected_rewards = beta * jax.lax.stop_gradient(pr - rr)
  return losses, chosen_rewards, rejected_rewards


def dpo_metric_sums(chosen_rewards: jax.Array, rejected_rewards: jax.Array,
                    policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
                    weights: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Weighted sums of `dpo_metrics`' quantities (divide by the pair count outside).

  Sums rather than means let a trainer add them over micro-batches and devices and skip
  padding pairs (weight 0) before dividing once.

  Args:
    as `dpo_metrics`; weights: optional float [B] (default 1 per pair).
  Returns:
    dict of float32 scalars, `dpo_metrics`' keys.
  """
  f32 = lambda x: jax.lax.stop_gradient(x).astype(jnp.float32)
  rc, rr = f32(chosen_rewards), f32(rejected_rewards)
  w = jnp.ones_like(rc) if weights is None else f32(weights)
  return {
      "rewards/chosen": (rc * w).sum(),
      "rewards/rejected": (rr * w).sum(),
      "rewards/accuracies": ((rc > rr) * w).sum(),
      "rewards/margins": ((rc - rr) * w).sum(),
      "logps/chosen": (f32(policy_chosen_logps) * w).sum(),
      "logps/rejected": (f32(policy_rejected_logps) * w).sum(),
  }


def dpo_metrics(chosen_rewards: jax.Array, rejected_rewards: jax.Array,
                policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array
                ) -> dict[str, jax.Array]:
  """Batch means logged by TRL's DPOTrainer, under its names.

  Args:
    chosen_rewards, rejected_rewards: float [B] from `dpo_loss`;
    policy_chosen_logps, policy_rejected_logps: float [B], as passed to `dpo_loss`.
  Returns:
    dict of float32 scalars: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}.
  """
  sums = dpo_metric_sums(chosen_rewards, rejected_rewards, policy_chosen_logps,
                         policy_rejected_logps)
  return {k: v / chosen_rewards.shape[0] for k, v in sums.items()}


def bradley_terry_losses(chosen_scores: jax.Array, rejected_scores: jax.Array,
                         margin: jax.Array | float | None = None, center_coef: float = 0.0
                         ) -> jax.Array:
  """Per-pair terms of `bradley_terry_loss` (whose mean it is): float32 [B].

  A trainer sums these over the real pairs (skipping padding) and divides once.
  """
  rc, rr = chosen_scores.astype(jnp.float32), rejected_scores.astype(jnp.float32)
  diff = rc - rr if margin is None else rc - rr - jnp.asarray(margin, jnp.float32)  # [B]
  losses = -jax.nn.log_sigmoid(diff)
  if center_coef:
    losses = losses + center_coef * jnp.square(rc + rr)
  return losses


def bradley_terry_loss(chosen_scores: jax.Array, rejected_scores: jax.Array,
                       margin: jax.Array | float | None = None, center_coef: float = 0.0
                       ) -> tuple[jax.Array, jax.Array]:
  """Pairwise reward-model loss, as TRL's RewardTrainer.

  loss = mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)**2); the second
  term (Eisenstein et al. 2023, Eq. 2; TRL `center_rewards_coefficient`) pulls rewards to mean 0.

  Args:
    chosen_scores, rejected_scores: float [B], scalar reward per sequence.
    margin: optional float [B] (or scalar) the chosen score must beat the rejected one by.
    center_coef: weight of the centring term; 0 disables it.
  Returns:
    (loss, accuracy): float32 scalars; accuracy is the fraction with r_c > r_r (no margin).
  """
  loss = bradley_terry_losses(chosen_scores, rejected_scores, margin, center_coef).mean()
  rc, rr = chosen_scores.astype(jnp.float32), rejected_scores.astype(jnp.float32)
  accuracy = jax.lax.stop_gradient(rc > rr).astype(jnp.float32).mean()
  return loss, accuracy


LOSSES.update(dpo=dpo_loss, bradley_terry=bradley_terry_loss)


# GRPO family (and GSPO, DAPO, Dr. GRPO), after TRL 1.16's GRPOTrainer: advantages from
# `_generate_and_score_completions` (sum_then_normalize), the per-token loss and its aggregation
# from `_compute_loss`. Differences, on purpose: the aggregation is returned as (sum, count) so
# a trainer divides once over micro-batches and devices; "bnpo" and "dapo" both normalise by
# the completion tokens of the whole batch (TRL's bnpo by each micro-batch's own tokens, equal
# without gradient accumulation).

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


def grpo_loss(logps, old_logps, advantages, mask, ref_logps=None, *, loss_type: str = "dapo",
              max_completion_length: Optional[int] = None, **kw) -> jax.Array:
  """The batch loss TRL's `_compute_loss` returns (one process, no accumulation): scalar."""
  per_token, _ = grpo_per_token_loss(logps, old_logps, advantages, mask, ref_logps, **kw)
  s, n = grpo_loss_sum(per_token, mask, loss_type, max_completion_length)
  return s / jnp.maximum(n, 1.0)


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


LOSSES.update(grpo=grpo_loss)


# PPO (RLHF with a learned value function), after TRL's PPOTrainer and PPOConfig names:
# trl v0.19.0 (5b3ea9dd43b526f188ef8f63ca16bbe977ec8603) trl/trainer/ppo_trainer.py (rewards,
# GAE, clipped losses, metrics) and trl/core.py (masked_mean, masked_var, masked_whiten); the
# adaptive KL controller from trl v0.11.0 (e4935e13fcda106485ed5c85678c6f0bb0d1d10b)
# trl/trainer/utils.py `AdaptiveKLController` (Ziegler et al. 2019), dropped from later TRL.
# Completions are right-padded, so `mask` [B, M] is a prefix of True (EOS included) per row.
#
# One deliberate difference: TRL adds the score at index `sequence_length + 1` (one past the
# EOS when that fits) and keeps values and value targets one token past the EOS
# (`padding_mask_p1`). Here the score lands on the last completion token and rewards, values,
# GAE and the value loss all stop at the completion mask, so nothing is learned from the state
# after the episode ended. Tests compare each formula with TRL's on the same tensors.

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


LOSSES.update(ppo_policy=ppo_policy_losses, ppo_value=ppo_value_losses)
