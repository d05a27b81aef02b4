"""Preference losses: the DPO family and the Bradley-Terry reward-model loss, per pair.

Formulas follow TRL's DPOTrainer. Where TRL versions differ (checked against trl 1.16.0,
`DPOTrainer._compute_loss`, and the 0.x `DPOTrainer.dpo_loss` method):
- "sigmoid" + label_smoothing: 0.x applies conservative DPO (cDPO); 1.x dropped it and uses
  label_smoothing only for "robust"/"exo_pair". We keep cDPO; label_smoothing=0 matches both.
- "ipo": 0.x averaged per-token logps before the loss (`average_log_prob=loss_type == "ipo"`,
  later `all_logps / loss_mask.sum(-1)`), so its rewards and logps metrics are averages too;
  1.x passes sums and divides the log-ratios by the completion length (clamped to >= 1) inside
  the loss, which gives the same loss, but its reward metrics come from the sums.
  Here the caller passes means for "ipo" (the loss is equal in both versions).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

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
      summed completion logprobs (`sequence_logps_sum_and_mean`'s sums); for "ipo" pass its
      means (mean per-token logprobs) instead, since TRL length-normalises IPO.
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
  """The batch metrics TRL's DPOTrainer logs, under its names, as weighted sums over pairs.

  Sums rather than means let a trainer add them over micro-batches and devices and skip
  padding pairs (weight 0) before dividing once by the number of real pairs; with all weights 1,
  sum / B is TRL's batch mean.

  Args:
    chosen_rewards, rejected_rewards: float [B] from `dpo_loss`;
    policy_chosen_logps, policy_rejected_logps: float [B], the summed completion logprobs;
    weights: optional float [B], each pair's weight (default 1; the DPO trainer passes 1 for a
      real pair, 0 for a padding one).
  Returns:
    dict of float32 scalars: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}.
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


def bradley_terry_losses(chosen_scores: jax.Array, rejected_scores: jax.Array,
                         margin: jax.Array | float | None = None, center_coef: float = 0.0
                         ) -> jax.Array:
  """Pairwise reward-model loss per pair, as TRL's RewardTrainer.

  loss = -logsigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)**2; TRL's loss is the mean
  over pairs. The second term (Eisenstein et al. 2023, Eq. 2; TRL `center_rewards_coefficient`)
  pulls rewards to mean 0. A trainer sums these over the real pairs (skipping padding) and
  divides once.

  Args:
    chosen_scores, rejected_scores: float [B], scalar reward per sequence.
    margin: optional float [B] (or scalar) the chosen score must beat the rejected one by.
    center_coef: weight of the centring term; 0 disables it.
  Returns:
    float32 [B].
  """
  rc, rr = chosen_scores.astype(jnp.float32), rejected_scores.astype(jnp.float32)
  diff = rc - rr if margin is None else rc - rr - jnp.asarray(margin, jnp.float32)  # [B]
  losses = -jax.nn.log_sigmoid(diff)
  if center_coef:
    losses = losses + center_coef * jnp.square(rc + rr)
  return losses


def bradley_terry_metric_sums(chosen_scores: jax.Array, rejected_scores: jax.Array,
                              weights: jax.Array) -> dict[str, jax.Array]:
  """The reward trainer's metrics as weighted sums over pairs (divide by the pair count outside).

  "accuracy" is TRL's RewardTrainer accuracy (r_c > r_r, the margin ignored); "margin" is
  r_c - r_r.

  Args:
    chosen_scores, rejected_scores: float32 [B]; weights: float [B] (1 real pair, 0 padding).
  Returns:
    dict of float32 scalars: accuracy, reward_chosen, reward_rejected, margin.
  """
  rc, rr, w = chosen_scores, rejected_scores, weights
  return {"accuracy": ((rc > rr) * w).sum(), "reward_chosen": (rc * w).sum(),
          "reward_rejected": (rr * w).sum(), "margin": ((rc - rr) * w).sum()}
