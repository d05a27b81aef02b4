"""GRPO: the losses and advantages against TRL's GRPOTrainer on the same tensors, the step, the
loop on the arithmetic task (learning, no retrace, exact resume, one-line errors)."""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ftjax import losses

N, M = 6, 7


def _tensors(seed=0):
  rng = np.random.default_rng(seed)
  logps = -rng.uniform(0.05, 3.0, (N, M)).astype(np.float32)
  old = logps + rng.normal(0, 0.3, (N, M)).astype(np.float32)  # ratios beyond the clip range
  ref = logps + rng.normal(0, 0.5, (N, M)).astype(np.float32)
  adv = rng.normal(0, 1, N).astype(np.float32)
  mask = np.ones((N, M), np.float32)
  for i, n in enumerate([7, 5, 1, 3, 6, 0]):  # a row with no tokens (masked truncated)
    mask[i, n:] = 0
  return logps, old, ref, adv, mask


def _trl_loss(logps, old, ref, adv, mask, *, loss_type, level, beta, eps_low=0.2, eps_high=0.28):
  """TRL 1.16's own `GRPOTrainer._compute_loss` on these tensors: a bare instance with the
  attributes that method reads, the model forward replaced by the given logps."""
  from trl import GRPOTrainer
  t = GRPOTrainer.__new__(GRPOTrainer)
  lp = torch.tensor(logps, requires_grad=True)
  t._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.zeros_like(lp), None)
  t.top_entropy_quantile, t.off_policy_mask_threshold = 1.0, None
  t.importance_sampling_level, t.beta, t.loss_type = level, beta, loss_type
  t.epsilon_low, t.epsilon_high = eps_low, eps_high
  t.args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
  t.use_vllm, t.model = False, types.SimpleNamespace(training=True)
  t.current_gradient_accumulation_steps, t.max_completion_length = 1, M
  t.accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x,
                                        reduce=lambda x, reduction: x)
  t._metrics = {"train": collections.defaultdict(list)}
  t._entropy_bonus_enabled, t.aux_loss_enabled = False, False
  inputs = {"prompt_ids": torch.zeros((N, 2), dtype=torch.long),
            "prompt_mask": torch.ones((N, 2), dtype=torch.long),
            "completion_ids": torch.zeros((N, M), dtype=torch.long),
            "completion_mask": torch.tensor(mask, dtype=torch.long),
            "advantages": torch.tensor(adv), "old_per_token_logps": torch.tensor(old),
            "ref_per_token_logps": torch.tensor(ref),
            "num_items_in_batch": torch.tensor(mask.sum())}
  loss = t._compute_loss(None, inputs)
  loss.backward()
  return float(loss.detach()), lp.grad.numpy(), {k: v[-1] for k, v in t._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", losses.GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl(loss_type, level, beta):
  logps, old, ref, adv, mask = _tensors()
  want, want_grad, trl_metrics = _trl_loss(logps, old, ref, adv, mask, loss_type=loss_type,
                                           level=level, beta=beta)
  kw = dict(beta=beta, epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level=level)

  def ours(lp):
    return losses.grpo_loss(lp, old, adv, mask, ref if beta else None, loss_type=loss_type,
                            max_completion_length=M, **kw)
  got, grad = jax.value_and_grad(ours)(jnp.asarray(logps))
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-6)
  # Per token, against TRL's formula lines (the per-token tensor is local to _compute_loss).
  per_token, aux = losses.grpo_per_token_loss(jnp.asarray(logps), old, adv, mask,
                                              ref if beta else None, **kw)
  lr = torch.tensor(logps - old)
  mt = torch.tensor(mask)
  lw = lr if level == "token" else ((lr * mt).sum(-1) / mt.sum(-1).clamp(min=1.0)).unsqueeze(-1)
  c1 = torch.exp(lw)
  c2 = torch.clamp(c1, 1 - 0.2, 1 + 0.28)
  a = torch.tensor(adv).unsqueeze(1)
  ref_pt = -torch.min(c1 * a, c2 * a)
  if beta:
    d = torch.tensor(ref - logps)
    ref_pt = ref_pt + beta * (torch.exp(d) - d - 1)
  np.testing.assert_allclose(np.asarray(per_token), np.broadcast_to(ref_pt.numpy(), (N, M)),
                             rtol=1e-5, atol=1e-6)
  # Metrics under TRL's names and values.
  m = mask.astype(bool)
  if level == "token":
    low = float(np.asarray(aux["low_clipped"])[m].mean())
    high = float(np.asarray(aux["high_clipped"])[m].mean())
  else:
    low, high = (float(np.asarray(aux[k]).mean()) for k in ("low_clipped", "high_clipped"))
  assert low == pytest.approx(trl_metrics["clip_ratio/low_mean"], abs=1e-6)
  assert high == pytest.approx(trl_metrics["clip_ratio/high_mean"], abs=1e-6)
  if beta:
    kl = np.asarray(aux["kl"])
    assert (kl >= 0).all()  # k3 is non-negative
    assert float(kl[m].mean()) == pytest.approx(trl_metrics["kl"], rel=1e-5)


def test_first_iteration_ratio_is_one_and_nothing_clips():
  logps, _, _, adv, mask = _tensors(1)
  for level in ("token", "sequence"):
    _, aux = losses.grpo_per_token_loss(jnp.asarray(logps), jnp.asarray(logps), adv, mask,
                                        importance_sampling_level=level)
    assert np.all(np.asarray(aux["ratio"]) == 1.0)
    assert float(aux["low_clipped"].sum() + aux["high_clipped"].sum()) == 0.0


def _trl_advantages(rewards, g, scale):
  """TRL 1.16's advantage lines (`_generate_and_score_completions`, sum_then_normalize; they sit
  inside a long method that also generates, so they are copied, with TRL's own `nanstd`)."""
  from trl.trainer.utils import nanstd
  rewards = torch.tensor(rewards)
  mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
  if scale in ("group", "none"):
    std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
  else:
    std = nanstd(rewards).expand_as(rewards)
  adv = rewards - mean
  if scale != "none":
    adv = adv / (std + 1e-4)
  return torch.nan_to_num(adv, nan=0.0).numpy(), torch.isclose(std, torch.zeros_like(std)).numpy()


@pytest.mark.parametrize("scale", losses.SCALE_REWARDS)
def test_advantages_equal_trl(scale):
  rng = np.random.default_rng(2)
  r = rng.normal(size=12).astype(np.float32)
  r[4:8] = 0.5  # a group with zero std
  r[9] = np.nan  # an unscorable completion
  adv, zero = losses.grpo_advantages(jnp.asarray(r), 4, scale)
  want_adv, want_zero = _trl_advantages(r, 4, scale)
  np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(zero), want_zero)
  assert float(adv[9]) == 0.0
