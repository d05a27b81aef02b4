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

`dpo_loss` is the original four; `dpo_multi_loss` is TRL 1.16's `DPOTrainer._compute_loss`
whole: all of `TRL_DPO_LOSS_TYPES`, their weighted combination (`loss_type=[...]`,
`loss_weights`), the f-divergence scores (`f_divergence_type`) and, through
`ld_weighted_logps`, LD-DPO's `ld_alpha`. The DPO trainer calls `dpo_loss` when the config asks
for nothing beyond it, so those runs are unchanged. Reference-free pair losses: `orpo_loss`
(trl.experimental.orpo) and `cpo_loss` (trl.experimental.cpo: CPO, SimPO, AlphaPO).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
# TRL 1.16 DPOConfig.loss_type, in its order.
TRL_DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                      "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                      "sft", "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The losses built on the chosen-minus-rejected score difference (TRL refuses the others with a
# non-default f-divergence: their log Z(x) term does not cancel).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                           "discopop", "sft")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


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


def check_dpo_options(loss_types, loss_weights=None, label_smoothing: float = 0.0,
                      f_divergence_type: str = "reverse_kl", ld_alpha=None) -> list[float]:
  """`dpo_multi_loss`'s options, checked as TRL's DPOTrainer checks them; returns the weights.

  Raises ValueError (one line naming the config key) where TRL raises or would divide by zero.
  """
  for t in loss_types:
    if t not in TRL_DPO_LOSS_TYPES:
      raise ValueError(f"dpo.loss_type: unknown loss type {t!r}; expected one or a comma list of "
                       f"{', '.join(TRL_DPO_LOSS_TYPES)}")
  if not loss_types:
    raise ValueError("dpo.loss_type: empty; expected one or a comma list of loss types")
  weights = [1.0] * len(loss_types) if not loss_weights else [float(w) for w in loss_weights]
  if len(weights) != len(loss_types):
    raise ValueError(f"dpo.loss_weights: {len(weights)} weights for {len(loss_types)} loss types "
                     f"{list(loss_types)}")
  if f_divergence_type not in F_DIVERGENCES:
    raise ValueError(f"dpo.f_divergence_type: unknown {f_divergence_type!r}; expected one of "
                     f"{', '.join(F_DIVERGENCES)}")
  if f_divergence_type != "reverse_kl" and not set(loss_types) <= set(F_DIVERGENCE_LOSS_TYPES):
    raise ValueError(f"dpo.f_divergence_type={f_divergence_type!r} works only with the loss types "
                     f"{', '.join(F_DIVERGENCE_LOSS_TYPES)} (got {list(loss_types)})")
  if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"dpo.label_smoothing={label_smoothing}: robust DPO needs 0 <= it < 0.5")
  if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
    raise ValueError(f"dpo.label_smoothing={label_smoothing}: exo_pair needs 0 < it < 1 (the EXO "
                     "paper suggests 1e-3)")
  if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
    raise ValueError(f"dpo.ld_alpha={ld_alpha}: expected a value in [0, 1]")
  return weights


def ld_weighted_logps(token_logps: jax.Array, weights: jax.Array, ld_alpha: float) -> jax.Array:
  """LD-DPO's sequence logps (TRL `ld_alpha`): the first min(len_c, len_r) completion tokens of
  each pair count fully, the longer side's tail tokens times `ld_alpha`.

  Args:
    token_logps: float [2B, T], rows [0, B) chosen, [B, 2B) rejected (a preference batch).
    weights: float [2B, T], 1 on completion tokens.
  Returns:
    float32 [2B].
  """
  m = weights.astype(jnp.float32)
  pos = jnp.cumsum(m, axis=-1)  # [2B, T], the completion token's 1-based index
  lens = m.sum(-1)
  b = lens.shape[0] // 2
  shared = jnp.minimum(lens[:b], lens[b:])
  shared = jnp.concatenate([shared, shared])[:, None]  # [2B, 1]
  lp = token_logps.astype(jnp.float32)
  # TRL multiplies logps by the masks (not by the completion mask): positions outside the
  # completion have pos 0 (before it) or pos > shared only inside it, as cumsum stays flat after.
  shared_mask = (pos > 0) & (pos <= shared) & (m > 0)
  tail_mask = (pos > shared) & (m > 0)
  return (lp * shared_mask).sum(-1) + ld_alpha * (lp * tail_mask).sum(-1)


def _f_scores(logratios: jax.Array, f_divergence_type: str, alpha: float) -> jax.Array:
  """f'(pi / ref) for TRL's f-DPO, from log(pi / ref)."""
  if f_divergence_type == "reverse_kl":
    return logratios
  if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
    return 1 - jnp.exp(-logratios)
  if f_divergence_type == "js_divergence":  # f'(t) = log 2 + logsigmoid(log t)
    return math.log(2) + jax.nn.log_sigmoid(logratios)
  if f_divergence_type == "alpha_divergence":  # f'(t) = (t^(a-1) - 1) / (a-1)
    if abs(alpha - 1.0) < 1e-6:
      return logratios
    # TRL clamps the exponent at 80 (float32) so that exp stays finite.
    return (jnp.exp(jnp.minimum((alpha - 1.0) * logratios, 80.0)) - 1.0) / (alpha - 1.0)
  raise ValueError(f"dpo.f_divergence_type: unknown {f_divergence_type!r}")


def _sorted_valid(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x's real entries sorted ascending into the first n slots; (sorted [B], slot mask [B])."""
  s = jnp.sort(jnp.where(valid > 0, x, jnp.finfo(jnp.float32).max))
  slots = jnp.arange(x.shape[0]) < valid.sum()
  return jnp.where(slots, s, 0.0), slots


def dpo_multi_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
                   ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array, *,
                   chosen_lengths: jax.Array, rejected_lengths: jax.Array,
                   chosen_token_logps_sum: Optional[jax.Array] = None,
                   valid: Optional[jax.Array] = None, loss_types=("sigmoid",),
                   loss_weights=None, beta: float = 0.1, label_smoothing: float = 0.0,
                   f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                   discopop_tau: float = 0.05
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """TRL 1.16 `DPOTrainer._compute_loss`'s loss: sum_k w_k * mean over pairs of loss_type k.

  With s = f'(pi / ref) scores per side (`f_divergence_type`, log-ratios for reverse_kl) and
  d = s_c - s_r, eps = label_smoothing, r = beta * (policy - reference) logps per side:
    sigmoid       -logsigmoid(beta d) (1 - eps) - logsigmoid(-beta d) eps (eps > 0: cDPO, as
                  `dpo_loss`; TRL 1.x ignores eps here)
    hinge, robust as `dpo_loss`
    ipo           (s_c / len_c - s_r / len_r - 1 / (2 beta))^2 (length-normalised, as TRL)
    exo_pair      KL(softmax(beta d) || (1 - eps, eps)) over the two sides (needs 0 < eps < 1)
    nca_pair      -logsigmoid(r_c) - logsigmoid(-r_c) / 2 - logsigmoid(-r_r) / 2
    bco_pair      -logsigmoid(r_c) - logsigmoid(-r_r)
    sppo_hard     (lr_c - 1/2beta)^2 + (lr_r + 1/2beta)^2 on the log-ratios lr
    aot           sigmoid(cDPO) on sort(pi_c - pi_r) - sort(ref_c - ref_r) over the batch
    aot_unpaired  sigmoid(cDPO) on sort(lr_c) - sort(lr_r) over the batch
    apo_zero      1 - sigmoid(r_c) + sigmoid(r_r)
    apo_down      sigmoid(r_c) + 1 - sigmoid(r_c - r_r)
    discopop      mix of -logsigmoid(beta d) and exp(-beta d) by sigmoid(beta d / tau)
    sft           -(mean log-prob of the chosen tokens over the batch)
    sigmoid_norm  -logsigmoid(beta (s_c / len_c - s_r / len_r))

  "aot", "aot_unpaired" and "sft" are batch-level terms (sorted, or one token mean): their
  entries are not per pair, only their sum is meaningful.

  Args:
    policy_*, ref_*: float [B] sequence logps (summed; `ld_weighted_logps` for LD-DPO).
    chosen_lengths, rejected_lengths: float [B] completion token counts (for ipo/sigmoid_norm).
    chosen_token_logps_sum: float [B] plain summed chosen logps for "sft" (default: policy's).
    valid: float [B], 1 for a real pair, 0 for padding (default all 1).
    loss_types, loss_weights: as TRL's `loss_type` list and `loss_weights` (default 1 each).
  Returns:
    (losses, chosen_rewards, rejected_rewards), float32 [B]. The losses are already zero on
    padding pairs and sum, over the batch, to n_valid * TRL's loss: divide by the real pairs.
  """
  pc, pr, rc, rr = (x.astype(jnp.float32) for x in (
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
  valid = jnp.ones_like(pc) if valid is None else valid.astype(jnp.float32)
  weights = check_dpo_options(tuple(loss_types), loss_weights, label_smoothing,
                              f_divergence_type)
  eps = label_smoothing
  lr_c, lr_r = pc - rc, pr - rr  # [B] log-ratios
  s_c = _f_scores(lr_c, f_divergence_type, f_alpha_divergence_coef)
  s_r = _f_scores(lr_r, f_divergence_type, f_alpha_divergence_coef)
  delta = s_c - s_r
  len_c = jnp.maximum(chosen_lengths.astype(jnp.float32), 1.0)
  len_r = jnp.maximum(rejected_lengths.astype(jnp.float32), 1.0)
  ls = jax.nn.log_sigmoid
  smoothed = lambda z: -ls(beta * z) * (1 - eps) - ls(-beta * z) * eps
  total = jnp.zeros_like(pc)
  for loss_type, w in zip(loss_types, weights):
    if loss_type == "sigmoid":
      per = smoothed(delta)
    elif loss_type == "hinge":
      per = jax.nn.relu(1 - beta * delta)
    elif loss_type == "ipo":
      per = (s_c / len_c - s_r / len_r - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
      z = beta * delta
      per = (jax.nn.sigmoid(z) * (ls(z) - math.log1p(-eps))
             + jax.nn.sigmoid(-z) * (ls(-z) - math.log(eps)))
    elif loss_type == "nca_pair":
      per = -ls(beta * lr_c) - 0.5 * ls(-beta * lr_c) - 0.5 * ls(-beta * lr_r)
    elif loss_type == "robust":
      per = (-(1 - eps) * ls(beta * delta) + eps * ls(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
      per = -ls(beta * lr_c) - ls(-beta * lr_r)
    elif loss_type == "sppo_hard":
      per = (lr_c - 0.5 / beta) ** 2 + (lr_r + 0.5 / beta) ** 2
    elif loss_type in ("aot", "aot_unpaired"):
      a, b = (pc - pr, rc - rr) if loss_type == "aot" else (lr_c, lr_r)
      (sa, slots), (sb, _) = _sorted_valid(a, valid), _sorted_valid(b, valid)
      per = jnp.where(slots, smoothed(sa - sb), 0.0)
    elif loss_type == "apo_zero":
      per = 1 - jax.nn.sigmoid(beta * lr_c) + jax.nn.sigmoid(beta * lr_r)
    elif loss_type == "apo_down":
      per = jax.nn.sigmoid(beta * lr_c) + 1 - jax.nn.sigmoid(beta * (lr_c - lr_r))
    elif loss_type == "discopop":
      z = beta * delta
      mod = jax.nn.sigmoid(z / discopop_tau)
      per = -ls(z) * (1 - mod) + jnp.exp(-z) * mod
    elif loss_type == "sft":
      tok = pc if chosen_token_logps_sum is None else chosen_token_logps_sum.astype(jnp.float32)
      mean = (tok * valid).sum() / jnp.maximum((chosen_lengths * valid).sum(), 1.0)
      per = jnp.broadcast_to(-mean, pc.shape)
    elif loss_type == "sigmoid_norm":
      per = -ls(beta * (s_c / len_c - s_r / len_r))
    if loss_type not in ("aot", "aot_unpaired"):
      per = per * valid
    # TRL averages each term over the pairs before weighting; n * mean = the masked sum.
    total = total + w * per
  chosen_rewards = beta * jax.lax.stop_gradient(lr_c)
  rejected_rewards = beta * jax.lax.stop_gradient(lr_r)
  return total, chosen_rewards, rejected_rewards


def log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, branching at -log 2 against cancellation (as TRL's ORPO)."""
  return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
              beta: float = 0.1) -> tuple[jax.Array, ...]:
  """ORPO's odds-ratio term (Hong et al. 2024), as trl.experimental.orpo `odds_ratio_loss`.

  log_odds = (pi_c - pi_r) - (log(1 - e^pi_c) - log(1 - e^pi_r)) on mean per-token logps; the
  ORPO loss is NLL(chosen) - mean(losses), losses = beta * logsigmoid(log_odds) (beta is the
  paper's lambda). No reference model.

  Args:
    policy_chosen_logps, policy_rejected_logps: float [B], MEAN completion logprobs (< 0).
    beta: weight of the odds-ratio term.
  Returns:
    (losses, chosen_rewards, rejected_rewards, ratio, log_odds), float32 [B] each; TRL logs
    mean(ratio) as log_odds_ratio and mean(log_odds) as log_odds_chosen. rewards = beta * logps.
  """
  pc, pr = policy_chosen_logps.astype(jnp.float32), policy_rejected_logps.astype(jnp.float32)
  log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
  ratio = jax.nn.log_sigmoid(log_odds)
  sg = jax.lax.stop_gradient
  return beta * ratio, beta * sg(pc), beta * sg(pr), sg(ratio), sg(log_odds)


def cpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             simpo_gamma: float = 0.5, alpha: float = 0.0
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """CPO / SimPO / AlphaPO pair losses, as trl.experimental.cpo `CPOTrainer.cpo_loss`.

  Reference-free: logits = pi_c - pi_r (AlphaPO, alpha != 0: rewards (1 - p^-alpha) / alpha on
  p = exp(logps)). "sigmoid" and "simpo" are cDPO on beta * logits, simpo after subtracting the
  margin gamma / beta; "hinge" relu(1 - beta logits); "ipo" (logits - 1/(2 beta))^2. The whole
  loss is mean(losses) + cpo_alpha * NLL(chosen responses); SimPO is loss_type="simpo" with
  cpo_alpha=0.

  Args:
    policy_chosen_logps, policy_rejected_logps: float [B]; MEAN completion logprobs for "ipo" and
      "simpo" (length-normalised, as TRL), summed for "sigmoid"/"hinge".
  Returns:
    (losses, chosen_rewards, rejected_rewards), float32 [B] each.
  """
  if loss_type not in CPO_LOSS_TYPES:
    raise ValueError(f"cpo.loss_type: unknown loss type {loss_type!r}; expected one of "
                     f"{', '.join(CPO_LOSS_TYPES)}")
  pc, pr = policy_chosen_logps.astype(jnp.float32), policy_rejected_logps.astype(jnp.float32)
  if alpha != 0.0:
    rc_, rr_ = (1 - jnp.exp(pc) ** -alpha) / alpha, (1 - jnp.exp(pr) ** -alpha) / alpha
  else:
    rc_, rr_ = pc, pr
  logits = rc_ - rr_
  eps, ls = label_smoothing, jax.nn.log_sigmoid
  if loss_type == "simpo":
    logits = logits - simpo_gamma / beta
  if loss_type in ("sigmoid", "simpo"):
    losses = -ls(beta * logits) * (1 - eps) - ls(-beta * logits) * eps
  elif loss_type == "hinge":
    losses = jax.nn.relu(1 - beta * logits)
  else:
    losses = (logits - 1 / (2 * beta)) ** 2
  sg = jax.lax.stop_gradient
  return losses, beta * sg(rc_), beta * sg(rr_)


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_loss(policy_logps: jax.Array, ref_logps: jax.Array, labels: jax.Array, kl: jax.Array, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             loss_type: str = "kto") -> tuple[jax.Array, jax.Array]:
  """KTO (Ethayarajh et al. 2024) per example, as TRL's `KTOTrainer._compute_loss`.

  With r = policy - reference logps and z0 = kl (the batch's KL estimate, no gradient):
    "kto":               desirable 1 - sigmoid(beta (r - z0)),
                         undesirable 1 - sigmoid(beta (z0 - r))
    "apo_zero_unpaired": desirable 1 - sigmoid(beta r), undesirable sigmoid(beta r)
  times desirable_weight / undesirable_weight; TRL's loss is the mean over the batch.

  Args:
    policy_logps, ref_logps: float [B] summed completion logps; labels: [B], 1 desirable, 0 not.
    kl: float scalar z0 (TRL: mean over the KL rows of policy - reference logps, clamped >= 0).
  Returns:
    (losses, rewards) float32 [B]; rewards = beta * r, without gradient.
  """
  if loss_type not in KTO_LOSS_TYPES:
    raise ValueError(f"kto.loss_type: unknown loss type {loss_type!r}; expected one of "
                     f"{', '.join(KTO_LOSS_TYPES)}")
  r = policy_logps.astype(jnp.float32) - ref_logps.astype(jnp.float32)
  good = labels.astype(jnp.float32) > 0.5
  z0 = jax.lax.stop_gradient(jnp.asarray(kl, jnp.float32))
  if loss_type == "kto":
    chosen, rejected = 1 - jax.nn.sigmoid(beta * (r - z0)), 1 - jax.nn.sigmoid(beta * (z0 - r))
  else:
    chosen, rejected = 1 - jax.nn.sigmoid(beta * r), jax.nn.sigmoid(beta * r)
  losses = jnp.where(good, desirable_weight * chosen, undesirable_weight * rejected)
  return losses, beta * jax.lax.stop_gradient(r)


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
