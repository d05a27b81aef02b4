"""GRPO (and GSPO, DAPO, Dr. GRPO): the pure loss and step over a scored rollout batch, and the
host-side pieces the loop in experiments/grpo.py calls (batch assembly, metrics).

The step's batch (N = prompts * G rows; see `ftjax.rollout` for the first four arrays):
  prompt_tokens, prompt_mask [N, P]; completion_tokens, completion_mask [N, M]
  old_logprobs  float32 [N, M]  the sampler's behaviour logprobs (the policy at rollout time);
                                they equal `rollout.completion_logprobs` of those params, so the
                                first update's ratio is 1 to float32 rounding with no extra forward
  advantages    float32 [N]
  terminated    bool [N]
  ref_logprobs  float32 [N, M]  only when beta != 0 (one reference forward per rollout)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import heads, losses, rollout
from ftjax.train import common


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
  """The loss's knobs, TRL's GRPOConfig names."""
  loss_type: str = "dapo"
  beta: float = 0.0
  epsilon: float = 0.2
  epsilon_high: Optional[float] = None  # None: epsilon (symmetric clip)
  delta: Optional[float] = None
  importance_sampling_level: str = "token"
  mask_truncated_completions: bool = False
  temperature: float = 1.0
  max_completion_length: int = 0  # dr_grpo's constant; 0: the batch's M

  def check(self):
    if self.loss_type not in losses.GRPO_LOSS_TYPES:
      raise ValueError(f"loss_type={self.loss_type!r}: expected {losses.GRPO_LOSS_TYPES}")
    if self.importance_sampling_level not in ("token", "sequence"):
      raise ValueError(f"importance_sampling_level={self.importance_sampling_level!r}")
    return self


def loss_mask(batch: dict, s: GRPOSettings) -> jax.Array:
  """The completion tokens that count: truncated completions drop out entirely when
  `mask_truncated_completions` (TRL zeroes their completion mask)."""
  m = batch["completion_mask"].astype(jnp.float32)
  if s.mask_truncated_completions:
    m = m * batch["terminated"].astype(jnp.float32)[:, None]
  return m


def grpo_loss_fn(params, batch, rng, *, model, settings: GRPOSettings, chunk: int = 0):
  """(loss_sum, count, aux sums) of one (micro-)batch, for `common.update_step`.

  aux sums (divide on the host, `host_metrics`): tokens, seqs, kl, entropy, clip counts.
  """
  s = settings
  logps, hidden = rollout.completion_logprobs(model, params, batch, temperature=s.temperature,
                                              chunk=chunk, return_hidden=True, rng=rng)
  mask = loss_mask(batch, s)
  per_token, aux = losses.grpo_per_token_loss(
      logps, batch["old_logprobs"], batch["advantages"], mask,
      batch["ref_logprobs"] if s.beta else None, beta=s.beta, epsilon_low=s.epsilon,
      epsilon_high=s.epsilon_high, importance_sampling_level=s.importance_sampling_level,
      delta=s.delta)
  loss_sum, n = losses.grpo_loss_sum(per_token, mask, s.loss_type,
                                     s.max_completion_length or None)
  temp = s.temperature if s.temperature else 1.0
  entropy = losses.token_entropy(
      hidden, lambda h: heads.lm_logits(params, h, model.cfg) / temp, chunk)  # [N, M]
  sg = jax.lax.stop_gradient
  seq_level = s.importance_sampling_level == "sequence"
  # TRL: clip fractions over tokens, or over sequences at the sequence level.
  clip_w = jnp.ones((mask.shape[0], 1)) if seq_level else mask
  sums = {
      "tokens": mask.sum(), "seqs": jnp.asarray(mask.shape[0], jnp.float32),
      "entropy": sg(entropy * mask).sum(),
      "clip_ratio/low_mean": sg(aux["low_clipped"] * clip_w).sum(),
      "clip_ratio/high_mean": sg(aux["high_clipped"] * clip_w).sum(),
      "clip_ratio/region_mean": sg((aux["low_clipped"] + aux["high_clipped"]) * clip_w).sum(),
      "ratio_mean": sg(jnp.broadcast_to(aux["ratio"], mask.shape) * mask).sum(),
  }
  if s.beta:
    sums["kl"] = sg(aux["kl"] * mask).sum()
  return loss_sum, n, sums


def make_step(model, tx, schedule, settings: GRPOSettings, grad_accum: int = 1, axis_name=None,
              chunk: int = 0):
  """step(state, frozen, batch) -> (state, metrics); jitted (or pmapped) by the caller."""
  loss_fn = functools.partial(grpo_loss_fn, model=model, settings=settings.check(), chunk=chunk)
  return functools.partial(common.update_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                           grad_accum=grad_accum, axis_name=axis_name)


STEP_KEYS = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask",
             "old_logprobs", "advantages", "terminated", "ref_logprobs")


def step_batch(ro: dict, advantages: np.ndarray, ref_logprobs=None) -> dict:
  """The step's arrays from a rollout batch, its advantages and (beta != 0) reference logps."""
  out = {k: ro[k] for k in STEP_KEYS[:4]}
  out.update(old_logprobs=ro["logprobs"], advantages=np.asarray(advantages, np.float32),
             terminated=ro["terminated"])
  if ref_logprobs is not None:
    out["ref_logprobs"] = np.asarray(ref_logprobs, np.float32)
  return out


def host_metrics(m: dict, settings: GRPOSettings) -> dict:
  """Step metrics as floats: aux sums divided by their counts, under TRL's names."""
  m = {k: float(np.asarray(v)) for k, v in m.items()}
  tokens = max(m.pop("tokens"), 1.0)
  seqs = max(m.pop("seqs"), 1.0)
  clip_n = seqs if settings.importance_sampling_level == "sequence" else tokens
  for k in list(m):
    if k.startswith("clip_ratio/"):
      m[k] /= clip_n
    elif k in ("entropy", "kl", "ratio_mean"):
      m[k] /= tokens
  return m


def rollout_metrics(ro: dict, total: np.ndarray, per_fn: np.ndarray, names: list,
                    std_is_zero: np.ndarray, group_size: int) -> dict:
  """Reward and completion statistics of one rollout, TRL's names where it has them."""
  lengths = ro["completion_mask"].sum(-1)
  out = {"reward": float(np.nanmean(total)) if np.isfinite(total).any() else float("nan"),
         "reward_std": float(np.nanstd(total, ddof=1)) if np.isfinite(total).sum() > 1 else 0.0,
         "frac_reward_zero_std": float(np.asarray(std_is_zero).reshape(-1, group_size)[:, 0]
                                       .mean()),
         "completions/mean_length": float(lengths.mean()),
         "completions/max_length": float(lengths.max()),
         "completions/min_length": float(lengths.min()),
         "completions/clipped_ratio": float(1.0 - ro["terminated"].mean()),
         "completions/terminated_ratio": float(ro["terminated"].mean())}
  for j, name in enumerate(names):
    col = per_fn[:, j]
    ok = np.isfinite(col)
    out[f"rewards/{name}/mean"] = float(col[ok].mean()) if ok.any() else float("nan")
    out[f"rewards/{name}/std"] = float(col[ok].std(ddof=1)) if ok.sum() > 1 else 0.0
  return out
