"""The same steps on 1 device, on data/fsdp/tensor meshes and under pmap (8 fake CPU devices)."""

import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

import ftjax
from configs import sft as sft_config
from ftjax import checkpoint, metrics as metrics_lib, partition, sharding
from ftjax.train import common, sft
from tests.conftest import BASE_SEQ

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [("pjit", "data=1"), ("pjit", "data=8"), ("pjit", "fsdp=8"),
          ("pjit", "data=2,fsdp=2,tensor=2"), ("pmap", "data=-1")]


def test_eight_fake_devices():
  assert jax.device_count() == 8


# Each mesh class once per trainable layout, each against its own one-device run. LoRA: replicated
# trainables whose gradients reduce over data=8, and A/B split by the tensor rules of the mixed
# mesh. Full fine-tuning: trainables and Adam moments sharded by fsdp=8, and pmap's replicated
# whole state. (pmap's replicated LoRA state and fsdp's LoRA are the same reductions again; DPO,
# GRPO and PPO run pmap and fsdp with their own steps below and in their files.)
SFT_MESHES = {"lora": [("pjit", "data=1"), ("pjit", "data=8"), ("pjit", "data=2,fsdp=2,tensor=2")],
              "none": [("pjit", "data=1"), ("pjit", "fsdp=8"), ("pmap", "data=-1")]}


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_first_losses_equal_on_every_mesh(base_dir, chat_files, tmp_path, adapter):
  losses = {}
  for mode, shape in SFT_MESHES[adapter]:
    c = sft_config.get_config(f"adapter={adapter},smoke")
    c.model.hf_path = base_dir
    c.data.path, c.data.eval_path = chat_files[0], ""
    c.parallel, c.mesh.shape = mode, shape
    c.train.update(steps=3, batch_size=8, seq_len=BASE_SEQ, log_every=1, save_every=100,
                   eval_every=100, grad_accum=1)
    wd = str(tmp_path / f"{mode}_{shape}")
    sft.run(c, wd)
    losses[(mode, shape)] = [r["loss"] for r in metrics_lib.read_metrics(wd) if "loss" in r]
  ref = losses[("pjit", "data=1")]
  assert len(ref) == 3 and ref[0] != ref[-1]
  for key, got in losses.items():
    np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=str(key))


def test_sampler_same_tokens_sharded(base_dir):
  model, params = ftjax.load_pretrained(base_dir)
  tokens = np.random.default_rng(0).integers(6, 320, (8, 12)).astype(np.int32)
  plain = np.asarray(ftjax.generate(model, params, tokens, max_new_tokens=12).tokens)
  mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
  sharded = sharding.shard_params(model, params, mesh)
  up = sharded["layers"]["mlp"]["up_proj"]["kernel"]  # [L, D, F]
  assert tuple(up.sharding.spec) == (None, "fsdp", "tensor")
  with sharding.use_mesh(mesh):
    out = ftjax.generate(model, sharded, jax.device_put(tokens, sharding.batch_sharding(mesh)),
                         max_new_tokens=12)
  np.testing.assert_array_equal(np.asarray(out.tokens), plain)


def test_checkpoint_restores_on_another_mesh(base_dir, tmp_path):
  model, params = ftjax.load_pretrained(base_dir, lora=ftjax.LoraConfig(rank=2))
  trainable, _, _ = common.split_params(params, partition.rules_for("full"))
  tx = common.make_optimizer("adamw", common.make_schedule(1e-3, 10))

  def placed(spec, devices):
    mesh = sharding.make_mesh(spec, devices)
    tr = sharding.shard_params(model, trainable, mesh)
    with sharding.use_mesh(mesh):
      return jax.jit(lambda t: common.init_state(t, tx, 0))(tr)

  state8 = placed("fsdp=4,tensor=2", jax.devices())
  # One program for the whole tree (eagerly, each leaf's two ops compile on its own sharding).
  state8["params"] = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x * 1.5 + 0.25, p),
                             out_shardings=jax.tree_util.tree_map(lambda x: x.sharding,
                                                                  state8["params"]))(
                                                                      state8["params"])
  ck = checkpoint.Checkpointer(str(tmp_path / "w"), async_save=False)
  ck.save(1, state8)
  for spec, devices in (("data=4", jax.devices()[:4]), ("data=1", jax.devices()[:1]),
                        ("data=2,tensor=4", jax.devices())):
    target = placed(spec, devices)
    restored, _, _ = ck.restore(1, target=target)
    leaf = restored["params"]["embed"]
    assert leaf.sharding.mesh.devices.size == len(devices)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a),
                                                                      np.asarray(b)),
                           restored["params"], state8["params"])
  ck.close()


def test_steps_do_not_recompile(base_dir, chat_files):
  model, params = ftjax.load_pretrained(base_dir, lora=ftjax.LoraConfig(rank=2))
  par = sharding.Parallel("pjit", "data=2,fsdp=2,tensor=2")
  params = par.params(model, params)
  trainable, frozen, _ = common.split_params(params, partition.rules_for("lora"))
  schedule = common.make_schedule(1e-3, 10)
  tx = common.make_optimizer("adamw", schedule)
  with par.context():
    state = jax.jit(lambda t: common.init_state(t, tx, 0))(trainable)
  inner = sft.make_step(model, tx, schedule)

  def step_fn(state, frozen, batch):
    return inner(state, frozen, batch)

  traced = chex.assert_max_traces(step_fn, n=1)
  step = par.compile(lambda axis: traced, state, frozen)
  rng = np.random.default_rng(0)
  for _ in range(3):
    seq = rng.integers(6, 320, (8, 33)).astype(np.int32)
    batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:],
             "weights": np.ones((8, 32), np.float32)}
    state, m = step(state, frozen, par.batch(batch))
  assert np.isfinite(float(m["loss"]))


def test_param_without_rule_is_an_error(base_dir):
  model, params = ftjax.load_pretrained(base_dir)
  mesh = sharding.make_mesh("data=8")
  rules = tuple((k, v) for k, v in sharding.RULES if k != "mlp")
  with pytest.raises(ValueError, match=r"param layers/mlp/\w+_proj/kernel: logical axis 'mlp'"):
    sharding.param_shardings(model, params, mesh, rules)
  with pytest.raises(ValueError, match="unknown axis 'model'"):
    sharding.make_mesh("model=8")
  with pytest.raises(ValueError, match="do not divide"):
    sharding.make_mesh("data=3,fsdp=-1")


def test_indivisible_batch_fails_clearly(base_dir, chat_files, tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "sft.py"),
         "--config=" + os.path.join(ROOT, "configs", "sft.py") + ":adapter=lora,smoke",
         f"--workdir={tmp_path / 'w'}", f"--config.model.hf_path={base_dir}",
         f"--config.data.path={chat_files[0]}", "--config.mesh.shape=data=8",
         "--config.train.batch_size=12"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert res.returncode != 0
  last = res.stderr.strip().splitlines()[-1]
  assert "batch_size=12 does not divide over the 8 batch shards" in last, last


@pytest.fixture(scope="module")
def dpo_reference(base_dir, pref_files, tmp_path_factory):
  """First DPO losses on one device, no accumulation: what every mesh below must give."""
  from ftjax.train import dpo
  wd = str(tmp_path_factory.mktemp("dpo_reference") / "run")
  dpo.run(_dpo_config(base_dir, pref_files, "pjit", "data=1", 1), wd)
  ref = [r["loss"] for r in metrics_lib.read_metrics(wd) if "loss" in r]
  assert len(ref) == 3 and abs(ref[0] - np.log(2)) < 1e-5  # policy == reference at step 1
  return ref


def _dpo_config(base_dir, pref_files, mode, shape, grad_accum):
  from configs import dpo as dpo_config
  c = dpo_config.get_config("adapter=lora,smoke")
  c.model.hf_path = base_dir
  c.data.path, c.data.eval_path = pref_files[0], ""
  c.parallel, c.mesh.shape = mode, shape
  c.train.update(steps=3, batch_size=8, seq_len=BASE_SEQ, log_every=1, save_every=100,
                 eval_every=100, grad_accum=grad_accum)
  return c


# The mixed mesh accumulates 2 micro-batches of 4 pairs (a one-device run with accumulation is
# the same reduction on fewer shards); under pmap each of the 8 devices takes one pair, so no
# accumulation there. The reference (one device, no accumulation) is the fixture's.
@pytest.mark.parametrize("mode,shape,grad_accum", [("pjit", "data=2,fsdp=2,tensor=2", 2),
                                                   ("pmap", "data=-1", 1)])
def test_dpo_losses_equal_across_meshes(base_dir, pref_files, dpo_reference, tmp_path, mode,
                                        shape, grad_accum):
  from ftjax.train import dpo
  wd = str(tmp_path / "run")
  dpo.run(_dpo_config(base_dir, pref_files, mode, shape, grad_accum), wd)
  got = [r["loss"] for r in metrics_lib.read_metrics(wd) if "loss" in r]
  np.testing.assert_allclose(got, dpo_reference, atol=1e-5)


def test_load_pretrained_straight_into_shards(base_dir):
  model, params = ftjax.load_pretrained(base_dir, quant="nf4", lora=ftjax.LoraConfig(rank=2))
  mesh = sharding.make_mesh("fsdp=4,tensor=2")
  model_s, sharded = ftjax.load_pretrained(base_dir, quant="nf4", lora=ftjax.LoraConfig(rank=2),
                                           mesh=mesh)
  up = sharded["layers"]["mlp"]["up_proj"]  # stacked [L, ...]: the layers axis first
  assert tuple(up["lora_a"].sharding.spec) == (None, "fsdp", None)
  # 4-bit codes and scales keep the kernel's two axes: a quantized q_proj keeps its tensor axis.
  assert tuple(up["kernel"]["codes"].sharding.spec) == (None, "fsdp", "tensor")
  q_proj = sharded["layers"]["attn"]["q_proj"]["kernel"]
  assert tuple(q_proj["codes"].sharding.spec) == (None, "fsdp", "tensor")
  assert q_proj["codes"].addressable_shards[0].data.shape == (2, 32 // 2 // 4, 32 // 2)
  # in = 32 < 64: one scale per 2 output columns, [1, 16], split over tensor only.
  assert tuple(q_proj["scale_codes"].sharding.spec) == (None, None, "tensor")
  assert all(a is None for a in q_proj["scale_absmax"].sharding.spec)
  assert tuple(sharded["embed"].sharding.spec) == ("tensor", "fsdp")
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a),
                                                                    np.asarray(b)),
                         params, sharded)
  tokens = np.random.default_rng(0).integers(6, 320, (4, 9))
  with sharding.use_mesh(mesh):
    out = jax.jit(lambda p, t: model_s.apply({"params": p}, t))(sharded, tokens)
  # The reference jitted too: eagerly, each op of the 4-bit matmuls compiles on its own.
  want = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)
