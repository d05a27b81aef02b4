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

  def ours(lp):  # as the GRPO step: per-token loss, (sum, count), divided once
    per_token, _ = losses.grpo_per_token_loss(lp, old, adv, mask, ref if beta else None, **kw)
    s, n = losses.grpo_loss_sum(per_token, mask, loss_type, max_completion_length=M)
    return s / jnp.maximum(n, 1.0)
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


# ------------------------------------------------------------------------------------------------
# The loop on the arithmetic task.

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import chex  # noqa: E402

from configs import grpo as grpo_config  # noqa: E402
from ftjax import metrics as metrics_lib, workdir as wd  # noqa: E402
from ftjax.errors import UserError  # noqa: E402
from ftjax.train import grpo as grpo_train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A reward a random tiny model earns now and then (a digit first), so a few steps show learning.
OVERRIDES = ["--config.train.batch_size=32", "--config.grpo.num_generations=8",
             "--config.optim.lr=2e-2", "--config.grpo.max_completion_length=2",
             "--config.train.eval_every=1000", r"--config.grpo.rewards=('format_match:^\d',)",
             "--config.grpo.reward_weights=(1.0,)", "--config.train.log_every=1",
             "--config.grpo.warm_start_steps=0", "--config.data.eval_rows=8"]


def _config(**train):
  c = grpo_config.get_config("task=arithmetic,model=tiny,adapter=none")
  c.train.update(**{**dict(batch_size=32, eval_every=1000, log_every=1, save_every=1000),
                    **train})
  c.grpo.update(num_generations=8, max_completion_length=2, rewards=(r"format_match:^\d",),
                reward_weights=(1.0,), warm_start_steps=0)  # from scratch: seconds
  c.data.eval_rows = 8
  c.optim.lr = 2e-2
  return c


def test_arithmetic_run_raises_reward_without_retracing(tmp_path, monkeypatch):
  make = grpo_train.make_step

  def counted(*a, **k):
    step = make(*a, **k)

    def step_fn(state, frozen, batch):
      return step(state, frozen, batch)
    return chex.assert_max_traces(step_fn, n=1)
  monkeypatch.setattr(grpo_train, "make_step", counted)
  c = _config(steps=10)
  c.grpo.num_iterations = 2  # stored old logprobs: the second update's ratio moves off 1
  out = grpo_train.run(c, str(tmp_path / "run"))
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path / "run")) if "reward" in r]
  rewards_ = [r["reward"] for r in rows]
  assert out["step"] == 10 and len(rows) == 10
  assert np.mean(rewards_[-3:]) > np.mean(rewards_[:3]) + 0.3, rewards_
  for k in ("kl", "entropy", "clip_ratio/low_mean", "frac_reward_zero_std",
            "completions/mean_length", "rollout_seconds", "score_seconds",
            "advantages_seconds", "reference_seconds", "update_seconds",
            "rewards/format_match/mean"):
    assert k in rows[0] or (k == "kl" and c.grpo.beta == 0), k


def test_first_update_ratio_is_one_from_sampler_logprobs(tmp_path):
  """The behaviour logprobs are the old logprobs: the first update's ratio is 1 to rounding."""
  c = _config(steps=1)
  c.grpo.beta = 0.04  # and the reference forward runs
  out = grpo_train.run(c, str(tmp_path / "run"))
  assert abs(out["ratio_mean"] - 1.0) < 1e-5 and out["clip_ratio/region_mean"] == 0.0
  assert out["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference at step 0


@pytest.mark.parametrize("override,msg", [
    (dict(num_generations=1, scale_rewards="group"), "num_generations=1 with scale_rewards"),
    (dict(num_generations=5), "batch_size=32 is not divisible by config.grpo.num_generations=5"),
    (dict(warm_start_carry_drop=1.5), r"warm_start_carry_drop=1.5: a fraction"),
])
def test_bad_group_settings_are_one_line(tmp_path, override, msg):
  c = _config(steps=1)
  c.grpo.update(**override)
  with pytest.raises(UserError, match=msg) as e:
    grpo_train.run(c, str(tmp_path / "run"))
  assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "run")


def test_bad_data_and_rewards_are_one_line_cli(tmp_path):
  empty = tmp_path / "p.jsonl"
  empty.write_text(json.dumps({"prompt": "1+1="}) + "\n" + json.dumps({"prompt": ""}) + "\n")
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "grpo.py"),
         "--config=" + os.path.join(ROOT, "configs", "grpo.py"), f"--workdir={tmp_path / 'w'}",
         "--config.model.tokenizer=x", f"--config.data.path={empty}"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert res.returncode == 1
  assert res.stderr.strip().splitlines()[-1] == (
      f"error: {empty}: row 2: field 'prompt' is empty or not a string/messages")


def test_wrong_length_reward_is_one_line(tmp_path, monkeypatch):
  from ftjax import rewards
  bad = lambda prompts, completions, **kw: [0.0] * (len(completions) - 1)
  bad.__name__ = "my_reward"
  monkeypatch.setattr(rewards, "from_spec", lambda spec, named=None: bad)
  # The dry run on the first rows finds it before anything is written.
  with pytest.raises(UserError, match="reward function 'my_reward' returned 1 rewards for 2"):
    c = _config(steps=1)
    c.data.eval_rows = 0
    grpo_train.run(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def _latest(workdir):
  d = os.path.join(workdir, "checkpoints")
  return max([int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else [],
             default=0)


def test_killed_run_resumes_exactly(tmp_path):
  steps = 6  # a kill right after the first save (step 2), and 4 steps after it
  args = OVERRIDES + [f"--config.train.steps={steps}", "--config.train.save_every=2"]
  straight = str(tmp_path / "straight")
  c = _config(steps=steps, save_every=2)
  grpo_train.run(c, straight)
  killed = str(tmp_path / "killed")
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "grpo.py"),
         "--config=" + os.path.join(ROOT, "configs", "grpo.py")
         + ":task=arithmetic,model=tiny,adapter=none",
         f"--workdir={killed}"] + args
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "FTJAX_TEST_NO_ZYGOTE": "1"})  # as test_sft's kills
  t0 = time.time()
  while _latest(killed) < 2 and proc.poll() is None and time.time() - t0 < 240:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert 0 < _latest(killed) < steps
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "resumed from step" in res.stderr
  _, a, _, _ = wd.load_trained(straight)
  _, b, _, _ = wd.load_trained(killed)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x),
                                                                    np.asarray(y)), a, b)
  logged = [r for r in metrics_lib.read_metrics(killed) if "reward" in r]
  assert [r["step"] for r in logged] == list(range(1, steps + 1))
  assert [r["reward"] for r in logged] == [
      r["reward"] for r in metrics_lib.read_metrics(straight) if "reward" in r]
