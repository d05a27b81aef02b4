"""RLOO (`loss=rloo`): advantages and loss against TRL 1.16's RLOOTrainer methods on the same
tensors, the one-line refusals, and a seeded CLI run on the arithmetic task."""

import collections
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from configs import grpo as grpo_config
from ftjax import losses, metrics as metrics_lib, rewards
from ftjax.errors import UserError
from ftjax.train import grpo as grpo_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = 4


def _rollout(seed=0, n=16, m=5):
  """Per-function rewards with unscorable rows, sampler/reference logps and a right-padded
  completion mask (lengths 1..m)."""
  rng = np.random.default_rng(seed)
  per_fn = rng.normal(size=(n, 2)).astype(np.float32)
  per_fn[1] = np.nan  # unscorable: out of its siblings' baselines, advantage 0
  per_fn[2, 1] = np.nan  # one function's None: the other one counts (nansum)
  per_fn[4:8, :] = [0.7, 0.1]  # a group of equal rewards
  per_fn[9:12] = np.nan  # a group with one scorable completion: no baseline, advantage 0
  lengths = rng.integers(1, m + 1, n)
  mask = (np.arange(m)[None, :] < lengths[:, None]).astype(np.float32)
  old = (-rng.uniform(0.05, 2.0, (n, m)) * mask).astype(np.float32)  # 0 off the mask, as ours
  ref = (old + rng.normal(0, 0.4, (n, m)) * mask).astype(np.float32)
  return per_fn, mask, old, ref


def _trl_advantages(per_fn, weights, mask, old, ref, *, beta, normalize, clip):
  """TRL's own `RLOOTrainer._generate_and_score_completions` (the advantage code is inline in
  it) called on a bare stand-in `self`: generation, the model forwards and the reward calls
  replaced by the given token counts, logps and per-function rewards."""
  from trl.trainer.rloo_trainer import RLOOTrainer
  n = per_fn.shape[0]
  t = types.SimpleNamespace()
  t.accelerator = types.SimpleNamespace(device="cpu", process_index=0,
                                        reduce=lambda x, reduction: x, gather=lambda x: x)
  t.model = types.SimpleNamespace(training=True, is_gradient_checkpointing=False)
  t.ref_model = object()
  t.args = types.SimpleNamespace(per_device_train_batch_size=n,
                                 gradient_checkpointing_kwargs=None)
  completion_ids = [[5] * int(k) for k in mask.sum(1)]  # right-padded: TRL's mask is `mask`
  t._generate = lambda prompts: ([[1, 2]] * n, completion_ids, ["x"] * n)
  t._tokenizer = types.SimpleNamespace(pad_token_id=0)
  t.pad_to_multiple_of, t.mask_truncated_completions = None, False
  t._get_per_token_logps_and_entropies = lambda model, *a, **k: (
      torch.tensor(ref if model is t.ref_model else old), None, None)
  t.beta, t.num_generations = beta, G
  t._calculate_rewards = lambda *a: torch.tensor(per_fn)
  t.reward_weights = torch.tensor(weights)
  t.reward_clip_range, t.normalize_advantages = clip, normalize
  t.reward_func_names = ["a", "b"]
  t._metrics = {"train": collections.defaultdict(list)}
  t._logs = {"prompt": [], "completion": [], "rewards": collections.defaultdict(list),
             "advantages": [], "extra": collections.defaultdict(list)}
  t._pending_extra_logs, t._pending_metrics, t.log_multimodal = {}, {}, False
  out = RLOOTrainer._generate_and_score_completions(t, [{"prompt": "p"}] * n)
  return out["advantages"].numpy(), {k: v[-1] for k, v in t._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("clip", [None, (-0.5, 0.8)])
def test_advantages_equal_trl(beta, normalize, clip):
  """Our host path (rewards.score, then the trainer's `advantages`, KL from the rollout's
  logps) against TRL's method on the same per-function rewards and logps."""
  per_fn, mask, old, ref = _rollout()
  weights = [1.0, 0.5]
  fns = []
  for j in range(2):
    def fn(prompts, completions, _j=j, **kw):
      return [None if np.isnan(v) else float(v) for v in per_fn[:, _j]]
    fn.__name__ = "ab"[j]
    fns.append(fn)
  n = per_fn.shape[0]
  total, got_per_fn, _ = rewards.score(fns, weights, ["p"] * n, ["x"] * n, {})
  g = ml_collections.ConfigDict(dict(scale_rewards="group", normalize_advantages=normalize,
                                     reward_clip_range=clip or ()))
  s = grpo_train.GRPOSettings(loss_type="rloo", beta=beta)
  ro = {"completion_mask": mask, "terminated": np.ones(n, bool), "logprobs": old}
  adv, zero, extra = grpo_train.advantages(total, G, g, s, ro, ref if beta else None)
  want, trl_metrics = _trl_advantages(per_fn, weights, mask, old, ref, beta=beta,
                                      normalize=normalize, clip=clip)
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)
  assert adv[1] == 0.0 and (adv[9:12] == 0).all() and adv[8] == 0
  assert zero.reshape(-1, G)[:, 0].mean() == pytest.approx(trl_metrics["frac_reward_zero_std"])
  if beta:
    assert extra["kl"] == pytest.approx(trl_metrics["kl"], rel=1e-5)
  else:
    assert not extra
  if not beta and not normalize:  # whitening moves a flat group off 0, as in TRL
    assert (adv[4:8] == 0).all()


def test_leave_one_out_by_hand():
  """The definition, independent of TRL: r_i minus the mean of the other k - 1 rewards."""
  r = np.array([1.0, 0.0, 0.0, 3.0, 2.0, 2.0, 5.0, 1.0], np.float32)
  adv, _ = losses.rloo_advantages(jnp.asarray(r), 4)
  want = [r[i] - np.delete(r[i // 4 * 4:i // 4 * 4 + 4], i % 4).mean() for i in range(8)]
  np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-6)


def _trl_loss(logps, old, adv, mask, eps_low, eps_high):
  """TRL's own `RLOOTrainer._compute_loss` on a bare instance, its model forward replaced by
  the given per-token logps (a leaf, for the gradient)."""
  from trl.trainer.rloo_trainer import RLOOTrainer
  t = RLOOTrainer.__new__(RLOOTrainer)
  lp = torch.tensor(logps, requires_grad=True)
  t._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.zeros_like(lp), None)
  t.epsilon_low, t.epsilon_high = eps_low, eps_high
  t.model = types.SimpleNamespace(training=True)
  t.aux_loss_enabled = False
  t.accelerator = types.SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x)
  t._metrics = {"train": collections.defaultdict(list)}
  n, m = logps.shape
  mt = torch.tensor(mask, dtype=torch.long)
  inputs = {"prompt_ids": torch.zeros((n, 2), dtype=torch.long),
            "prompt_mask": torch.ones((n, 2), dtype=torch.long),
            "completion_ids": torch.zeros((n, m), dtype=torch.long), "completion_mask": mt,
            # TRL stores the old logps summed over the completion (mask applied)
            "old_logps": (torch.tensor(old) * mt).sum(1), "advantages": torch.tensor(adv)}
  loss = t._compute_loss(None, inputs)
  loss.backward()
  return float(loss.detach()), lp.grad.numpy(), {k: v[-1] for k, v in t._metrics["train"].items()}


@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.1, 0.28)])
def test_loss_and_gradient_equal_trl(eps):
  rng = np.random.default_rng(3)
  n, m = 8, 6
  mask = (np.arange(m)[None, :] < np.array([6, 4, 1, 3, 5, 0, 2, 6])[:, None]).astype(np.float32)
  old = (-rng.uniform(0.05, 2.0, (n, m)) * mask).astype(np.float32)
  logps = (old + rng.normal(0, 0.15, (n, m))).astype(np.float32)  # ratios beyond the clips
  adv = rng.normal(0, 1, n).astype(np.float32)
  want, want_grad, trl_metrics = _trl_loss(logps, old, adv, mask, *eps)

  def ours(lp):  # as the step: (sum, count), divided once
    s, c, _ = losses.rloo_loss_sum(lp, old, adv, mask, epsilon_low=eps[0], epsilon_high=eps[1])
    return s / c
  got, grad = jax.value_and_grad(ours)(jnp.asarray(logps))
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-6)
  _, _, aux = losses.rloo_loss_sum(jnp.asarray(logps), old, adv, mask, epsilon_low=eps[0],
                                   epsilon_high=eps[1])
  low, high = float(aux["low_clipped"].mean()), float(aux["high_clipped"].mean())
  assert low == pytest.approx(trl_metrics["clip_ratio/low_mean"])
  assert high == pytest.approx(trl_metrics["clip_ratio/high_mean"])
  assert low + high > 0  # the test does reach the clip


def test_grpo_config_unchanged_without_rloo():
  """The RLOO keys exist only with loss=rloo: a GRPO config (and its config.json) is as
  before, and GRPO's step never takes the RLOO branch."""
  c = grpo_config.get_config("task=arithmetic")
  assert "normalize_advantages" not in c.grpo and c.grpo.epsilon_high == 0.28
  r = grpo_config.get_config("task=arithmetic,loss=rloo")
  assert r.grpo.loss_type == "rloo" and r.grpo.normalize_advantages is False
  assert r.grpo.epsilon_high == 0.0 and grpo_train.settings_from(r).epsilon_high is None


def _config(**grpo):
  c = grpo_config.get_config("task=arithmetic,model=tiny,adapter=none,loss=rloo")
  c.train.update(steps=1, batch_size=32, eval_every=1000, log_every=1, save_every=1000)
  c.grpo.update(num_generations=8, max_completion_length=2, rewards=(r"format_match:^\d",),
                reward_weights=(1.0,), warm_start_steps=0)
  c.grpo.update(**grpo)
  c.data.eval_rows = 8
  return c


@pytest.mark.parametrize("override,msg", [
    (dict(num_generations=1), r"^config.grpo.num_generations=1: RLOO's leave-one-out"),
    (dict(loss_type="rlooo"), r"^config.grpo.loss_type='rlooo': expected one of grpo, .*rloo"),
    (dict(scale_rewards="batch"), r"^config.grpo.scale_rewards='batch' is a GRPO option"),
    (dict(importance_sampling_level="sequence"), r"^config.grpo.importance_sampling_level="),
    (dict(loss_type="dapo", normalize_advantages=True),
     r"^config.grpo.normalize_advantages=True is an RLOO option"),
    (dict(reward_clip_range=(1.0, 0.0)), r"^config.grpo.reward_clip_range=\(1.0, 0.0\)"),
])
def test_bad_rloo_settings_are_one_line(tmp_path, override, msg):
  with pytest.raises(UserError, match=msg) as e:
    grpo_train.run(_config(**override), str(tmp_path / "run"))
  assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "run")


def test_cli_arithmetic_held_out_reward_rises(tmp_path):
  """experiments/grpo.py with loss=rloo from a random tiny model, seeded: the greedy held-out
  reward (a digit first) rises over a few steps. With beta != 0 the reference forward runs and
  its KL goes into the advantages (none in the loss): at step 1 the policy is the reference,
  so kl is 0 and the first ratio 1. The CLI's refusal is one stderr line. (Seeds 0, 1, 2 of
  this run went from 0 to 1.0, 0.94, 1.0; 4 steps without warmup were not enough.)"""
  base = [sys.executable, os.path.join(ROOT, "experiments", "grpo.py"),
          "--config=" + os.path.join(ROOT, "configs", "grpo.py")
          + ":task=arithmetic,model=tiny,adapter=none,loss=rloo"]
  args = ["--config.train.batch_size=32", "--config.grpo.num_generations=8",
          "--config.optim.lr=2e-2", "--config.grpo.max_completion_length=2",
          r"--config.grpo.rewards=('format_match:^\d',)", "--config.grpo.reward_weights=(1.0,)",
          "--config.grpo.warm_start_steps=0", "--config.data.eval_rows=16",
          "--config.grpo.eval_pass_at_g=False",
          "--config.train.steps=8", "--config.train.eval_every=8", "--config.train.seed=0",
          "--config.grpo.normalize_advantages=True", "--config.grpo.beta=0.05"]
  w = tmp_path / "w"
  res = subprocess.run(base + [f"--workdir={w}"] + args, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  rows = metrics_lib.read_metrics(str(w))
  before = next(r["eval_reward_before"] for r in rows if "eval_reward_before" in r)
  after = [r["eval_reward"] for r in rows if "eval_reward" in r][-1]
  assert after >= before + 0.3, (before, after)
  first = next(r for r in rows if r.get("step") == 1 and "kl" in r)
  assert first["kl"] == pytest.approx(0.0, abs=1e-6)
  assert abs(first["ratio_mean"] - 1.0) < 1e-5 and first["clip_ratio/region_mean"] == 0.0
  saved = json.load(open(w / "config.json"))
  assert saved["grpo"]["loss_type"] == "rloo" and saved["grpo"]["normalize_advantages"]
  # A misspelt RLOOConfig name (the in-process refusals are test_bad_rloo_settings_are_one_line).
  bad = subprocess.run(base + [f"--workdir={tmp_path / 'bad'}",
                               "--config.grpo.normalize_advantage=True"],
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 1 and not os.path.exists(tmp_path / "bad")
  assert bad.stderr.strip().splitlines()[-1].startswith(
      "error: --config.grpo.normalize_advantage: no such config field"), bad.stderr[-500:]
