"""PPO: rewards, GAE, whitening, clipped losses and the KL controller against TRL's code and
formulas on the same tensors; a short seeded PPO run that raises the reward without retracing.

TRL's PPO left trl 1.x; the reference code below is copied verbatim from
trl v0.19.0 (commit 5b3ea9dd43b526f188ef8f63ca16bbe977ec8603): trl/core.py (masked_mean,
masked_var, masked_whiten) and trl/trainer/ppo_trainer.py (GAE loop, policy and value losses);
and trl v0.11.0 (e4935e13fcda106485ed5c85678c6f0bb0d1d10b) trl/trainer/utils.py
(AdaptiveKLController).
"""

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ftjax import losses


# ---- TRL v0.19.0 trl/core.py, verbatim
def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: Optional[bool] = None) -> torch.Tensor:  # noqa: E501
  """Compute mean of tensor with a masked values."""
  if axis is not None:
    return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
  else:
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
  """Compute variance of tensor with masked values."""
  mean = masked_mean(values, mask)
  centered_values = values - mean
  variance = masked_mean(centered_values**2, mask)
  if unbiased:
    mask_sum = mask.sum()
    if mask_sum == 0:
      raise ValueError(
          "The sum of the mask is zero, which can happen when `mini_batch_size=1`;"
          "try increase the `mini_batch_size` or `gradient_accumulation_steps`"
      )
    # note that if mask_sum == 1, then there is a division by zero issue
    # to avoid it you just need to use a larger minibatch_size
    bessel_correction = mask_sum / (mask_sum - 1)
    variance = variance * bessel_correction
  return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:  # noqa: E501
  """Whiten values with masked values."""
  mean, var = masked_mean(values, mask), masked_var(values, mask)
  whitened = (values - mean) * torch.rsqrt(var + 1e-8)
  if not shift_mean:
    whitened += mean
  return whitened


# ---- TRL v0.11.0 trl/trainer/utils.py, verbatim
class AdaptiveKLController:
  """
  Adaptive KL controller described in the paper:
  https://huggingface.co/papers/1909.08593
  """

  def __init__(self, init_kl_coef, target, horizon):
    self.value = init_kl_coef
    self.target = target
    self.horizon = horizon

  def update(self, current, n_steps):
    target = self.target
    proportional_error = np.clip(current / target - 1, -0.2, 0.2)
    mult = 1 + proportional_error * n_steps / self.horizon
    self.value *= mult


def _case(seed=0, b=6, m=9):
  """Random per-token tensors and right-padded completion masks (an empty and a full row)."""
  rng = np.random.default_rng(seed)
  lengths = np.array([0, m, 1, 4, 7, 3][:b])
  mask = np.arange(m)[None, :] < lengths[:, None]
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  return dict(mask=mask, rewards=f(b, m), values=f(b, m), logps=f(b, m) - 2,
              old_logps=f(b, m) - 2, ref_logps=f(b, m) - 2, adv=f(b, m), returns=f(b, m),
              scores=f(b))


def _t(x):
  return torch.tensor(np.asarray(x))


def test_gae_equals_a_reverse_python_loop():
  c = _case()
  gamma, lam = 0.97, 0.9
  adv, ret = jax.jit(losses.gae, static_argnums=(3, 4))(c["rewards"], c["values"], c["mask"],
                                                          gamma, lam)
  r, v, mask = c["rewards"].astype(np.float64), c["values"].astype(np.float64), c["mask"]
  want = np.zeros_like(r)
  for i in range(r.shape[0]):  # one episode per row: its completion tokens only
    n = int(mask[i].sum())
    last = 0.0
    for t in reversed(range(n)):
      next_v = v[i, t + 1] if t + 1 < n else 0.0
      last = r[i, t] + gamma * next_v - v[i, t] + gamma * lam * last
      want[i, t] = last
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, (want + v) * mask, rtol=1e-5, atol=1e-5)

  # TRL's loop (ppo_trainer.py) on rewards and values zeroed past the mask gives the same.
  rewards, values = _t(r * mask), _t(v * mask)
  lastgaelam = 0
  advantages_reversed = []
  gen_length = rewards.shape[1]
  for t in reversed(range(gen_length)):
    nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
    delta = rewards[:, t] + gamma * nextvalues - values[:, t]
    lastgaelam = delta + gamma * lam * lastgaelam
    advantages_reversed.append(lastgaelam)
  advantages = torch.stack(advantages_reversed[::-1], axis=1)
  np.testing.assert_allclose(adv, advantages.numpy() * mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_equals_trl(shift_mean):
  c = _case(1)
  got = losses.masked_whiten(jnp.asarray(c["adv"]), jnp.asarray(c["mask"]), shift_mean)
  want = masked_whiten(_t(c["adv"]), _t(c["mask"]), shift_mean)
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(losses.masked_var(jnp.asarray(c["adv"]), jnp.asarray(c["mask"])),
                             masked_var(_t(c["adv"]), _t(c["mask"])).numpy(), rtol=1e-5)


def test_policy_and_value_losses_equal_trl():
  c = _case(2)
  cliprange, cliprange_value, vf_coef = 0.2, 0.2, 0.1
  m = c["mask"]
  pg, pg_clip, ratio = losses.ppo_policy_losses(c["logps"], c["old_logps"], c["adv"], cliprange)
  vf, vf_clip = losses.ppo_value_losses(c["values"], c["old_logps"], c["returns"],
                                        cliprange_value)
  jm = jnp.asarray(m)
  got_pg, got_vf = losses.masked_mean(pg, jm), losses.masked_mean(vf, jm)

  # TRL ppo_trainer.py, with its padding masks equal to ~mask (see losses/ppo.py on the EOS + 1).
  new_logprobs, mb_logprobs, mb_advantage = _t(c["logps"]), _t(c["old_logps"]), _t(c["adv"])
  vpred, mb_values, mb_return = _t(c["values"]), _t(c["old_logps"]), _t(c["returns"])
  padding_mask = padding_mask_p1 = ~_t(m)
  vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
  vf_losses1 = torch.square(vpred - mb_return)
  vf_losses2 = torch.square(vpredclipped - mb_return)
  vf_loss_max = torch.max(vf_losses1, vf_losses2)
  vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask_p1)
  vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
  logprobs_diff = new_logprobs - mb_logprobs
  ratio_t = torch.exp(logprobs_diff)
  pg_losses = -mb_advantage * ratio_t
  pg_losses2 = -mb_advantage * torch.clamp(ratio_t, 1.0 - cliprange, 1.0 + cliprange)
  pg_loss_max = torch.max(pg_losses, pg_losses2)
  pg_loss = masked_mean(pg_loss_max, ~padding_mask)
  loss = pg_loss + vf_coef * vf_loss
  pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)

  np.testing.assert_allclose(got_pg, pg_loss.item(), rtol=1e-5)
  np.testing.assert_allclose(got_vf, vf_loss.item(), rtol=1e-5)
  np.testing.assert_allclose(got_pg + vf_coef * got_vf, loss.item(), rtol=1e-5)
  np.testing.assert_allclose(losses.masked_mean(pg_clip, jm), pg_clipfrac.item(), rtol=1e-6)
  np.testing.assert_allclose(losses.masked_mean(vf_clip, jm), vf_clipfrac.item(), rtol=1e-6)
  np.testing.assert_allclose(ratio, ratio_t.numpy(), rtol=1e-6)
  assert 0 < float(losses.masked_mean(pg_clip, jm)) < 1  # the clip is exercised both ways


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_rewards_kl_and_score_at_the_last_token(estimator):
  c = _case(3)
  m, kl_coef = c["mask"], 0.05
  rewards, kl, non_score = losses.ppo_rewards(c["logps"], c["ref_logps"], c["scores"], m,
                                              kl_coef, estimator)
  # TRL ppo_trainer.py step 4 (its score index aside).
  logr = _t(c["ref_logps"]) - _t(c["logps"])
  kl_t = -logr if estimator == "k1" else (logr.exp() - 1) - logr
  np.testing.assert_allclose(kl, kl_t.numpy() * m, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(non_score, -kl_coef * kl_t.numpy() * m, rtol=1e-5, atol=1e-7)
  want = -kl_coef * kl_t.numpy() * m
  for i, n in enumerate(m.sum(-1)):
    if n:
      want[i, n - 1] += c["scores"][i]
  np.testing.assert_allclose(rewards, want, rtol=1e-5, atol=1e-6)
  if estimator == "k3":
    assert float(jnp.min(kl)) >= 0.0


def test_missing_eos_penalty():
  scores = jnp.array([1.0, 2.0, 3.0])
  done = jnp.array([True, False, True])
  np.testing.assert_allclose(losses.apply_missing_eos_penalty(scores, done, 1.5), [1, 0.5, 3])
  np.testing.assert_allclose(losses.apply_missing_eos_penalty(scores, done, None), scores)


def test_adaptive_kl_controller_equals_trl():
  ref = AdaptiveKLController(0.2, 6.0, 10000.0)
  value = 0.2
  for current in [0.5, 3.0, 6.0, 7.1, 20.0, 0.0, 5.9]:
    ref.update(current, 256)
    value = losses.adaptive_kl_update(value, current, 256, 6.0, 10000.0)
    np.testing.assert_allclose(float(value), ref.value, rtol=1e-6)


# ---- a short PPO run on a tiny model with a callable reward
TARGET, EOS = 5, 1


def _tiny_policy(vocab=16):
  from ftjax import heads
  from ftjax.config import get_preset
  from ftjax.model import Decoder, init_params
  cfg = get_preset("tiny").replace(vocab_size=vocab, pad_token_id=0, eos_token_id=EOS,
                                   bos_token_id=None)
  model = Decoder(cfg)
  return model, {**init_params(model, jax.random.PRNGKey(0)), **heads.init_value(cfg)}


def _target_fraction(batch):
  """The reward: the fraction of completion tokens that are TARGET (host side, like a scorer)."""
  tok, m = np.asarray(batch["completion_tokens"]), np.asarray(batch["completion_mask"])
  return ((tok == TARGET) & m).sum(1) / m.shape[1]


def _ppo_run(iterations, lr=3e-3, seed=0, adaptive=None):
  import chex
  import functools
  from ftjax import rollout
  from ftjax.train import common, ppo
  model, params = _tiny_policy()
  ref = jax.tree_util.tree_map(jnp.copy, {k: v for k, v in params.items() if k != "value"})
  schedule = common.make_schedule(lr, 10_000, kind="constant")
  tx = common.make_optimizer("adam", schedule)
  state = common.init_state(params, tx, seed)
  frozen = {"ref": ref}
  critic = ppo.Critic("shared")
  exp = functools.partial(
      ppo.experience, model=model, ref_model=model, ref_params_fn=lambda p: p["ref"],
      critic=critic, temperature=1.0, kl_estimator="k1", gamma=1.0, lam=0.95,
      missing_eos_penalty=None)
  step = ppo.make_ppo_step(model, critic, tx, schedule, cliprange=0.2, cliprange_value=0.2,
                           vf_coef=0.1, temperature=1.0, ppo_epochs=2, num_mini_batches=2)
  exp_fn = jax.jit(chex.assert_max_traces(lambda *a: exp(*a), n=1))
  step_fn = jax.jit(chex.assert_max_traces(lambda *a: step(*a), n=1), donate_argnums=0)
  rng = np.random.default_rng(seed)
  kl_coef, rewards, logs = 0.02, [], []
  for it in range(iterations):
    prompts = [list(rng.integers(6, 16, rng.integers(1, 5))) for _ in range(16)]
    full = {**state["params"], **frozen}
    batch = rollout.rollout(model, full, prompts, n_samples=1, max_new_tokens=8,
                            rng=jax.random.PRNGKey(1000 + it), temperature=1.0, eos_ids=(EOS,),
                            pad_id=0, prompt_len=4)
    scores = _target_fraction(batch)
    batch, m = exp_fn(full, batch, jnp.asarray(scores, jnp.float32), jnp.float32(kl_coef))
    state, um = step_fn(state, frozen, batch)
    rewards.append(float(scores.mean()))
    logs.append({**jax.device_get(m), **jax.device_get(um), "kl_coef": kl_coef})
    if adaptive:
      kl_coef = float(losses.adaptive_kl_update(kl_coef, float(m["objective/kl"]), 16,
                                                *adaptive))
  return rewards, logs


def test_short_ppo_run_raises_the_reward_without_retracing():
  rewards, logs = _ppo_run(20)
  first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
  assert last > first + 0.3, rewards
  # The first minibatch of each rollout sees ratio 1 (behaviour = current policy), so the
  # average ratio stays near 1 and something was clipped at some point.
  assert all(abs(lg["val/ratio"] - 1) < 0.2 for lg in logs)
  assert max(lg["policy/clipfrac_avg"] for lg in logs) > 0
  assert logs[-1]["objective/kl"] > 0
  # The policy sharpens on the target token: its entropy (nats per token, of the full
  # distribution) falls from about log(16) at the start.
  assert logs[0]["policy/entropy_avg"] > 2.0 > logs[-1]["policy/entropy_avg"], (
      logs[0]["policy/entropy_avg"], logs[-1]["policy/entropy_avg"])


# ---- ftjax.train.ppo.run end to end: a tiny HF reward model, exact resume, one-line errors
def _reward_model_dir(tmp_path_factory):
  import transformers as T
  from tests.conftest import BASE_VOCAB, hf_config
  torch.manual_seed(1)
  cfg = hf_config("llama", BASE_VOCAB)  # base_dir's vocabulary, which PPO checks
  cfg.num_labels, cfg.pad_token_id = 1, 0
  d = str(tmp_path_factory.mktemp("rm_hf"))
  T.LlamaForSequenceClassification(cfg).eval().save_pretrained(d)
  return d


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
  return _reward_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
  import json
  d = tmp_path_factory.mktemp("prompts")
  path = str(d / "prompts.jsonl")
  rows = [{"prompt": "Where is my order?"}, {"prompt": "I want to return the jacket."},
          {"prompt": [{"role": "user", "content": "Hello, order #12345 please."}]},
          {"prompt": "Can you help me?", "extra": 1}, {"prompt": "Where is the blue jacket?"}]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path


def _config(base_dir, rm_dir, prompt_file, arg="adapter=lora,smoke", **train):
  from configs import ppo as ppo_config
  c = ppo_config.get_config(arg)
  c.model.hf_path = base_dir
  c.ppo.reward_model = rm_dir
  c.data.update(path=prompt_file, eval_path=prompt_file, max_prompt_len=24)
  c.ppo.update(response_length=8, missing_eos_penalty=1.0, adap_kl_ctrl=True, target=0.01)
  c.optim.lr = 1e-2
  c.train.update(keep=4, log_every=1, **train)
  return c


def _params(workdir):
  from ftjax import workdir as wd
  return wd.load_trained(workdir)[1]


@pytest.mark.parametrize("arg", ["adapter=lora,smoke", "adapter=none,smoke,critic=separate"])
def test_experiment_runs_and_resumes_exactly(base_dir, rm_dir, prompt_file, tmp_path, arg):
  import shutil
  from ftjax.train import ppo as ppo_train
  from ftjax import metrics as metrics_lib
  straight = str(tmp_path / "straight")
  out = ppo_train.run(_config(base_dir, rm_dir, prompt_file, arg), straight)
  for k in ("objective/kl", "objective/scores", "objective/rlhf_reward", "policy/clipfrac_avg",
            "val/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "policy/approxkl_avg",
            "val/ratio", "policy/entropy_avg", "eval_scores"):
    assert np.isfinite(out[k]), (k, out)
  rows = [r for r in metrics_lib.read_metrics(straight) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert rows[1]["objective/kl_coef"] != rows[0]["objective/kl_coef"]  # adaptive controller
  for k in ("rollout_seconds", "score_seconds", "experience_seconds", "update_seconds"):
    assert rows[0][k] > 0, k  # the loop's phases (its update ran under the transfer guard)

  # A run that lost its last checkpoint (killed before it): rerunning the same command resumes
  # at step 2 and ends bitwise equal, with the same logged losses.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  ppo_train.run(_config(base_dir, rm_dir, prompt_file, arg), resumed)
  a, b = _params(straight), _params(resumed)
  assert set(a) == set(b) and "value" not in a and "critic" not in a  # the policy alone
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x),
                                                                    np.asarray(y)), a, b)
  again = [r for r in metrics_lib.read_metrics(resumed) if "loss" in r]
  assert [r["loss"] for r in again] == [r["loss"] for r in rows]


def test_bad_input_is_a_one_line_error(base_dir, rm_dir, prompt_file, tmp_path):
  import json
  from ftjax.train import ppo as ppo_train
  from ftjax.errors import UserError
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": " "}) + "\n")
  cases = [({"ppo.reward_model": ""}, "config.ppo.reward_model is required"),
           ({"ppo.reward_model": str(tmp_path)}, "neither a reward workdir nor an HF"),
           ({"ppo.reward_model": base_dir}, "not a reward model"),
           ({"data.path": str(bad)}, "bad.jsonl: row 2: field 'prompt' is empty"),
           ({"ppo.num_mini_batches": 3}, "must split into config.ppo.num_mini_batches=3"),
           ({"ppo.temperature": 0.0}, "config.ppo.temperature=0.0"),
           ({"ppo.critic": "both"}, "config.ppo.critic='both'")]
  for overrides, msg in cases:
    c = _config(base_dir, rm_dir, prompt_file)
    for k, v in overrides.items():
      section, key = k.split(".")
      c[section][key] = v
    workdir = tmp_path / "w"
    with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
      ppo_train.run(c, str(workdir))
    assert "\n" not in str(e.value)
    assert not workdir.exists()  # nothing written


@pytest.mark.parametrize("mode,shape", [("pjit", "data=8"), ("pjit", "fsdp=8"),
                                        ("pmap", "data=-1")])
def test_losses_equal_across_meshes(base_dir, rm_dir, prompt_file, tmp_path, mode, shape):
  """The same run on 1 device, data=8, fsdp=8 and pmap (8 fake devices): the same losses.
  One minibatch per epoch: pmap shuffles each device's rows, so with several minibatches its
  minibatches (not its epoch) differ from the global shuffle's."""
  from ftjax.train import ppo as ppo_train
  from ftjax import metrics as metrics_lib

  def losses_of(mode, shape, name):
    c = _config(base_dir, rm_dir, prompt_file)
    c.parallel, c.mesh.shape = mode, shape
    c.ppo.num_mini_batches = 1
    c.data.eval_path = ""  # the losses are compared, not the eval: no greedy rollout
    c.train.update(steps=2, batch_size=8, eval_every=100, save_every=100)
    ppo_train.run(c, str(name))
    return [[r[k] for k in ("loss", "loss/value_avg", "objective/kl")]
            for r in metrics_lib.read_metrics(str(name)) if "loss" in r]

  ref_dir = tmp_path.parent / "ppo_reference_run"
  if not (ref_dir / "metrics.jsonl").exists():
    losses_of("pjit", "data=1", ref_dir)
  ref = [[r[k] for k in ("loss", "loss/value_avg", "objective/kl")]
         for r in metrics_lib.read_metrics(str(ref_dir)) if "loss" in r]
  np.testing.assert_allclose(losses_of(mode, shape, tmp_path / "run"), ref, rtol=1e-4,
                             atol=1e-5)
