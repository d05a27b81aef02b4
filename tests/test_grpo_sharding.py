"""The GRPO step gives the same losses on 1 device, data=8, fsdp=8 and under pmap (8 fake CPU
devices), through ftjax.train.grpo's own loop (PPO's: tests/test_ppo.py)."""


import numpy as np
import pytest

from ftjax import metrics as metrics_lib

MESHES = [("pjit", "data=8"), ("pjit", "fsdp=8"), ("pmap", "data=-1")]


def _losses(workdir):
  return [r["loss"] for r in metrics_lib.read_metrics(workdir) if "loss" in r]


def _grpo_config(mode, shape):
  from configs import grpo as grpo_config
  c = grpo_config.get_config("task=arithmetic,model=tiny,adapter=none")
  # A reward the random model earns now and then (an arithmetic character anywhere), so the
  # advantages are not all 0 (else Adam would scale float noise in the gradient up to lr).
  c.grpo.update(num_generations=4, max_completion_length=4, beta=0.04, warm_start_steps=0,
                rewards=(r"format_match:[0-9+=]",), reward_weights=(1.0,), num_iterations=2)
  # 16 completions: 2 rows per device on 8 devices. Plain SGD with a large lr: the second
  # rollout samples from params the first updates really moved, and (unlike Adam, which scales
  # the rounding noise of near-zero gradients up to lr) rounding differences stay rounding.
  c.train.update(steps=2, batch_size=16, log_every=1, eval_every=1000, save_every=1000)
  c.optim.update(name="sgd", b1=0.0, lr=1.0)
  # No held-out eval: the losses are compared, and the greedy eval of 64 prompts before and
  # after (two rollouts per 4 prompts) cost more than the training here.
  c.data.eval_rows = 0
  c.parallel, c.mesh.shape = mode, shape
  return c


@pytest.fixture(scope="module")
def grpo_reference(tmp_path_factory):
  from ftjax.train import grpo as grpo_train
  wd = str(tmp_path_factory.mktemp("grpo_ref") / "run")
  grpo_train.run(_grpo_config("pjit", "data=1"), wd)
  rewards = [r["reward"] for r in metrics_lib.read_metrics(wd) if "reward" in r]
  assert all(0 < r < 1 for r in rewards), rewards
  return _losses(wd)


@pytest.mark.parametrize("mode,shape", MESHES)
def test_grpo_losses_equal_across_meshes(grpo_reference, tmp_path, mode, shape):
  from ftjax.train import grpo as grpo_train
  wd = str(tmp_path / "run")
  grpo_train.run(_grpo_config(mode, shape), wd)
  ref = grpo_reference
  assert len(ref) == 2 and ref[0] != ref[1] and np.all(np.isfinite(ref))
  np.testing.assert_allclose(_losses(wd), ref, atol=1e-5)
