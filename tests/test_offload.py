"""train.offload (ftjax/offload.py): the same training in another memory.

On XLA's CPU backend a memory-kind move inside a jit lowers to nothing (jax lowers it for GPU
and TPU only), so what runs here is the same arithmetic: the losses must equal the
non-offloaded run's. What can be checked of the offload itself is checked on the programs: the
optimizer state's arrays and the compiled step's parameters are in pinned_host, the traced
step writes the remat residuals to host memory, and the step lowered for CUDA carries XLA's
placement annotations."""

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import metrics as metrics_lib, partition
from ftjax import workdir as wd
from ftjax.config import LoraConfig, ModelConfig, get_preset
from ftjax.errors import UserError
from ftjax.recipes import aot
from ftjax.model import AdapterSpec, Decoder
from ftjax.train import common, loop, sft
from tests.test_sft import make_config

# A scaled-down Llama (as test_aot's), full remat as the AOT table compiles it.
CFG = ModelConfig(family="llama", vocab_size=512, d_model=256, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=64, mlp_dim=512, param_dtype="bfloat16",
                  dtype="bfloat16", remat="full")


def _losses(workdir):
  return [r["loss"] for r in metrics_lib.read_metrics(workdir) if "loss" in r]


def _params(workdir):
  return wd.load_trained(workdir)[1]


def test_optimizer_offload_trains_as_on_device_and_resumes_exactly(sft_lora_run, base_dir,
                                                                   chat_files, tmp_path,
                                                                   monkeypatch):
  """sft_lora_run (offload none: 4 LoRA steps, grad_accum 2, dropout, saved at 2 and 4) against
  the same run with the optimizer state in pinned_host, killed after step 2's checkpoint and
  resumed: exactly equal losses and params. Exact, not within a tolerance, because on the CPU
  the compiled step is the same program (the moves lower to nothing; only its parameters'
  memory space differs)."""
  ref_dir, _ = sft_lora_run
  train, ev = chat_files
  kinds = []
  restore = loop.restore

  def spy(*a, **k):  # the state a run trains from: fresh, or restored from a checkpoint
    out = restore(*a, **k)
    kinds.append({x.sharding.memory_kind for x in jax.tree_util.tree_leaves(out[1]["opt_state"])})
    return out
  monkeypatch.setattr(loop, "restore", spy)

  w = str(tmp_path / "optimizer")
  config = make_config(base_dir, train, ev, steps=4, eval_every=2, save_every=2,
                       offload="optimizer")
  sft.run(config, w)
  shutil.rmtree(os.path.join(w, "checkpoints", "4"))  # as if killed after step 2's save
  sft.run(config, w)
  assert kinds == [{"pinned_host"}, {"pinned_host"}]  # orbax restores into pinned_host
  assert _losses(w) == _losses(ref_dir)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x),
                                                                    np.asarray(y)),
                         _params(w), _params(ref_dir))


def test_activation_offload_gives_the_same_loss_and_gradients():
  """The offloading remat against none, on the tiny preset's loss and LoRA gradients: within
  float32 rounding (1e-6 of each leaf's scale), not exact, because remat changes which values
  are recomputed and XLA may fuse (and round) a recomputed block differently."""
  cfg = get_preset("tiny").replace(remat="none")
  spec = AdapterSpec(lora=LoraConfig(rank=4, alpha=8.0, targets="all-linear", init="gaussian"))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
  # Random values of the params' shapes (no init compile); LoRA's B != 0, so every factor
  # gets a gradient.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype),
      aot.abstract_params(Decoder(cfg, spec)))
  trainable, frozen, _ = common.split_params(params, partition.rules_for("lora"))

  def loss_and_grads(c):
    model = Decoder(c, spec)

    def loss(tr):
      logits = model.apply({"params": partition.merge(tr, frozen)}, tokens)[:, :-1]
      logp = jax.nn.log_softmax(logits)
      return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    return jax.jit(jax.value_and_grad(loss))(trainable)
  ref, got = loss_and_grads(cfg), loss_and_grads(cfg.replace(remat_offload=True))
  # Each leaf to 1e-6 of its own scale: a gradient entry near 0 carries the rounding of the
  # sums that produce its neighbours.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      b, a, rtol=1e-6, atol=1e-6 * float(np.abs(a).max())), ref, got)
  assert float(ref[0]) > 0


def test_offloaded_step_places_state_and_residuals_on_host():
  """The compiled step of `--bench=aot --aot_offload`: its optimizer-state parameters are
  pinned_host (in the executable's layout too), the rest stays on the device, and the
  residuals written to the host are exactly those `dots_with_no_batch_dims_saveable` keeps
  beyond full remat."""
  both = aot.run_one(CFG, "sft", "lora", offload="both", batch=2, seq_len=16, chunk=0,
                     count_flops=False)
  s = aot.setup(CFG, "lora")
  n_opt = len(jax.tree_util.tree_leaves(s.state["opt_state"]))
  assert both["host_argument_bytes"] == both["opt_state_bytes"] > 0
  assert both["host_entry_params"] == n_opt  # XLA's own parameter layout: S(5), host memory
  assert both["device_argument_bytes"] == both["argument_bytes"] - both["opt_state_bytes"]

  def scan_outputs(cfg):
    _, fn, args, _, _ = aot.sft_step(cfg, "lora", batch=2, seq_len=16, chunk=0)
    return aot.host_residual_bytes(jax.make_jaxpr(fn)(*args).jaxpr, host_only=False)
  saved = (scan_outputs(CFG.replace(remat="dots_with_no_batch_dims_saveable"))
           - scan_outputs(CFG))
  assert both["host_residual_bytes"] == saved > 0


def test_offload_lowers_to_xla_placements_for_cuda():
  """Lowered for CUDA (no GPU needed to lower): the residuals and the optimizer state's moves
  are `annotate_device_placement` custom calls, the host-side ones to pinned_host."""
  _, fn, args, _, _ = aot.sft_step(CFG.replace(remat_offload=True), "lora", batch=2, seq_len=16,
                                   chunk=0)
  args = (jax.eval_shape(fn, *args)[0],) + args[1:]
  in_sh = aot._single_device_shardings(args, True)
  args = aot.placed(args, in_sh)  # as the trainer's arrays: the state's moments on the host
  text = jax.jit(fn, in_shardings=in_sh).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  to_host = text.count('_xla_buffer_placement = "pinned_host"')
  to_device = text.count('_xla_buffer_placement = "device"')
  n_opt = len(jax.tree_util.tree_leaves(args[0]["opt_state"]))
  # Each moment in for the update and back; each offloaded residual out and back in.
  assert to_device >= n_opt and to_host >= n_opt
  assert text.count('mhlo.memory_kind = "pinned_host"') >= 2 * n_opt  # args and results
  plain = aot.sft_step(CFG, "lora", batch=2, seq_len=16, chunk=0)
  plain_args = (jax.eval_shape(plain[1], *plain[2])[0],) + plain[2][1:]
  text = jax.jit(plain[1]).trace(*plain_args).lower(lowering_platforms=("cuda",)).as_text()
  assert "annotate_device_placement" not in text


@pytest.mark.parametrize("bad,match", [
    ({"offload": "optimiser"}, "config.train.offload='optimiser': expected one of none, "
                               "optimizer, activations, both"),
    ({"offload": "both", "parallel": "pmap"}, "needs config.parallel='pjit'"),
])
def test_offload_config_checked(base_dir, chat_files, tmp_path, bad, match):
  c = make_config(base_dir, *chat_files, steps=2)
  c.train.offload = bad["offload"]
  c.parallel = bad.get("parallel", c.parallel)
  with pytest.raises(UserError, match=re.escape(match)) as e:
    sft.run(c, str(tmp_path / "run"))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "run")
