"""Bottleneck adapters (Houlsby / Pfeiffer): a fresh adapter leaves the model unchanged, one
adapter is h + up(act(down(h))), a seeded SFT run learns, a killed and resumed run ends where an
uninterrupted one does, and merged / PEFT exports are refused in one line."""

import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

import ftjax
from configs import sft as sft_config
from ftjax import export, heldout, hf, lora, partition
from ftjax import workdir as wd
from ftjax.config import BottleneckConfig, get_preset
from ftjax.errors import UserError
from ftjax.model import Bottleneck
from ftjax.train import setup, sft
from tests.test_cli import ENV, _error_lines, _script
from tests.conftest import BASE_SEQ


def _adapter_keys(params):
  return {k for k in traverse_util.flatten_dict(params) if any("_adapter" in p for p in k)}


@pytest.mark.parametrize("placement,sites", [("houlsby", {"attn_adapter", "mlp_adapter"}),
                                             ("pfeiffer", {"mlp_adapter"})])
def test_fresh_adapter_leaves_logits_unchanged(hf_models, placement, sites):
  d, torch_model = hf_models["llama"]
  bc = BottleneckConfig(reduction_factor=4, placement=placement)
  base_model, base = hf.load_pretrained(d)
  model, params = hf.load_pretrained(d, bottleneck=bc)
  keys = _adapter_keys(params)
  assert {k[1] for k in keys} == sites
  d_model = base_model.cfg.d_model
  shapes = {k[1:]: params_leaf.shape for k, params_leaf in traverse_util.flatten_dict(
      params).items() if k in keys}
  assert shapes[(sorted(sites)[0], "down")] == (base_model.cfg.n_layers, d_model, d_model // 4)
  tokens = np.random.default_rng(0).integers(0, 320, (2, 12))
  ours = np.asarray(model.apply({"params": params}, tokens))
  np.testing.assert_array_equal(ours, np.asarray(base_model.apply({"params": base}, tokens)))
  with torch.no_grad():  # and the base is transformers' model
    ref = torch_model(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  # The partition rules train the adapters and nothing else.
  labels = traverse_util.flatten_dict(partition.label_params(params, partition.rules_for(
      "bottleneck")))
  assert {k for k, v in labels.items() if v == partition.TRAIN} == keys
  # Trained (non-zero) adapters change the logits; switched off, the base model comes back.
  flat = traverse_util.flatten_dict(params)
  rng = np.random.default_rng(1)
  for k in keys:
    flat[k] = jnp.asarray(rng.normal(0, 0.2, flat[k].shape), flat[k].dtype)
  moved = traverse_util.unflatten_dict(flat)
  assert np.abs(np.asarray(model.apply({"params": moved}, tokens)) - ours).max() > 1e-3
  np.testing.assert_array_equal(
      np.asarray(lora.disable(model).apply({"params": moved}, tokens)), ours)
  # The KV-cache decode runs the adapters too: greedy tokens equal the full forward's argmax.
  # Teacher-forced: one full forward over the prompt and the first 3 generated tokens; its
  # argmax at each of the last 4 positions is the next generated token (the first mismatch
  # of a greedy loop of growing forwards is a mismatch here too, at one compile, not four).
  out = np.asarray(ftjax.generate(model, moved, tokens[:1, :6], max_new_tokens=4).tokens)
  seq = np.concatenate([tokens[:1, :6], out[:, :3]], axis=1)
  greedy = np.asarray(model.apply({"params": moved}, seq))[:, 5:].argmax(-1)
  np.testing.assert_array_equal(out, greedy)


def test_one_adapter_is_down_act_up_with_residual():
  """The module against the formula in numpy (float64): h + relu(h @ down + b1) @ up + b2."""
  cfg = get_preset("tiny")
  bc = BottleneckConfig(reduction_factor=8, placement="pfeiffer")
  mod = Bottleneck(cfg, bc)
  h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, cfg.d_model)), jnp.float32)
  p = jax.tree_util.tree_map(np.asarray, mod.init(jax.random.PRNGKey(0), h)["params"])
  p = {k: np.asarray(getattr(v, "value", v)) for k, v in p.items()}
  assert not p["up"].any() and not p["up_bias"].any() and p["down"].shape == (64, 8)
  rng = np.random.default_rng(2)
  p = {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in p.items()}
  got = np.asarray(mod.apply({"params": p}, h))
  hh = np.asarray(h, np.float64)
  want = hh + np.maximum(hh @ p["down"] + p["down_bias"], 0) @ p["up"] + p["up_bias"]
  np.testing.assert_allclose(got, want, atol=1e-5)


def _config(base_dir, train, ev, steps):
  c = sft_config.get_config("adapter=bottleneck,smoke")
  c.model.hf_path = base_dir
  c.data.path, c.data.eval_path = train, ev
  c.adapter.update(reduction_factor=4, placement="houlsby")
  # constant: the stopped run's schedule (steps=4) is the same as the uninterrupted one's
  c.optim.update(lr=3e-3, schedule="constant")
  c.train.update(steps=steps, seq_len=BASE_SEQ, batch_size=4, save_every=2, eval_every=steps,
                 log_every=1, async_save=False)
  return c


def test_sft_learns_resumes_and_refuses_merged_export(base_dir, chat_files, tmp_path):
  train, ev = chat_files
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  sft.run(_config(base_dir, train, ev, 6), straight)
  # Stopped at step 4 and run again to 6: the adapters and optimizer state come back from the
  # checkpoint, and the run ends where the uninterrupted one did.
  sft.run(_config(base_dir, train, ev, 4), resumed)
  sft.run(_config(base_dir, train, ev, 6), resumed)
  model, params, _, config = wd.load_trained(straight)
  _, params2, _, _ = wd.load_trained(resumed)
  keys = _adapter_keys(params)
  flat, flat2 = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params2)
  for k in keys:
    np.testing.assert_allclose(np.asarray(flat2[k]), np.asarray(flat[k]), atol=1e-6)
  assert all(np.asarray(flat[k]).any() for k in keys if k[-1] == "up")  # trained off zero
  _, base = hf.load_pretrained(base_dir)
  for k, v in traverse_util.flatten_dict(base).items():  # the base stays frozen
    np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v))
  assert setup.adapter_spec(config).bottleneck == BottleneckConfig(4, "houlsby")
  # The held-out loss falls below the base's.
  kw = dict(seq_len=BASE_SEQ, batch_size=4, max_new_tokens=1)
  after = heldout.evaluate(ev, workdir=straight, **kw)["eval_loss"]
  before = heldout.evaluate(ev, model_path=base_dir, **kw)["eval_loss"]
  assert after < before - 0.05, (before, after)
  # No merged or PEFT export: one line, nothing written.
  with pytest.raises(UserError, match="cannot be merged"):
    export.export(straight, str(tmp_path / "peft"), "peft")
  out = tmp_path / "merged"
  res = subprocess.run(_script("export.py", f"--workdir={straight}", f"--out={out}"),
                       capture_output=True, text=True, timeout=300, env=ENV)
  assert res.returncode != 0 and len(_error_lines(res.stderr)) == 1, res.stderr[-2000:]
  assert "cannot be merged" in res.stderr and "nonlinearity" in res.stderr
  assert not out.exists() and not (tmp_path / "peft").exists()
  with pytest.raises(ValueError, match="cannot be merged"):
    hf.save_pretrained(model, params, str(tmp_path / "direct"))
