"""Numerics: float32 adapters over a bf16 base; float32 compute lowers to full-precision dots."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from ftjax import partition, quant
from ftjax.config import LoraConfig, PrefixConfig, dot_precision, get_preset
from ftjax.errors import UserError
from ftjax.model import AdapterSpec, Decoder, init_params
from ftjax.train import common, sft, setup

BF16 = dict(param_dtype="bfloat16", dtype="bfloat16")
# name -> (adapter spec, trainable rule set, extra ModelConfig fields)
ADAPTERS = {
    "lora": (AdapterSpec(lora=LoraConfig(rank=4)), "lora", {}),
    "dora": (AdapterSpec(lora=LoraConfig(rank=4, dora=True)), "lora", {}),
    "prefix": (AdapterSpec(prefix=PrefixConfig("prefix", length=3)), "prefix", {}),
    "prefix_mlp": (AdapterSpec(prefix=PrefixConfig("prefix", 3, reparam=True, reparam_hidden=16)),
                   "prefix", {}),
    "prompt": (AdapterSpec(prefix=PrefixConfig("prompt", length=3)), "prompt", {}),
    "score": (AdapterSpec(lora=LoraConfig(rank=4)), "lora", {"head": "score"}),
}


def _abstract_params(model):
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  return nn.meta.unbox(shapes)["params"]


def _rules(kind, cfg):
  extra = [("^score$", partition.TRAIN)] if cfg.head == "score" else []
  return partition.rules_for(kind, extra)


@pytest.mark.parametrize("name", ADAPTERS)
def test_trainable_leaves_are_float32_over_bf16_base(name):
  spec, kind, kw = ADAPTERS[name]
  cfg = get_preset("tiny", **BF16, **kw)
  params = _abstract_params(Decoder(cfg, spec))
  trainable, frozen, _ = common.split_params(params, _rules(kind, cfg))
  state = jax.eval_shape(lambda: common.init_state(trainable, optax.adamw(1e-3), 0))
  dtypes = lambda t: {x.dtype for x in jax.tree_util.tree_leaves(t)}  # noqa: E731
  assert dtypes(state["params"]) == {jnp.dtype("float32")}
  assert dtypes(state["opt_state"]) - {jnp.dtype("int32")} == {jnp.dtype("float32")}  # Adam mu/nu
  assert dtypes(frozen) == {jnp.dtype("bfloat16")}  # the base keeps its dtype
  if kw.get("head") == "score":
    assert params["score"].dtype == jnp.float32


def test_adapter_dtype_from_config():
  from configs import sft as sft_config
  c = sft_config.get_config("adapter=lora,smoke")
  assert setup.numerics_config(c) == {"adapter_dtype": "float32", "matmul_precision": "auto"}
  c.adapter.dtype = "float64"
  with pytest.raises(UserError, match=r"config\.adapter\.dtype='float64'"):
    setup.numerics_config(c)
  c.adapter.dtype, c.model.matmul_precision = "bfloat16", "tf32"
  with pytest.raises(UserError, match=r"config\.model\.matmul_precision='tf32'"):
    setup.numerics_config(c)


def _train(cfg, spec, params32, batch, steps, lr):
  """`steps` real SFT steps (adamw) from params32 cast to the config's param/adapter dtypes."""
  model = Decoder(cfg, spec)
  want = _abstract_params(model)
  params = jax.tree_util.tree_map(lambda p, s: p.astype(s.dtype), params32, want)
  trainable, frozen, _ = common.split_params(params, partition.rules_for("lora"))
  schedule = optax.constant_schedule(lr)
  tx = common.make_optimizer("adamw", schedule, 0.0, 0.0, 0.9, 0.999, 1e-8)
  state = common.init_state(trainable, tx, 0)
  step = jax.jit(sft.make_step(model, tx, schedule))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  return np.array(losses), state["params"]


def test_bf16_base_lora_run_tracks_fp32_run():
  cfg = get_preset("tiny", n_layers=1)
  spec = AdapterSpec(lora=LoraConfig(rank=4, alpha=8))
  params32 = init_params(Decoder(cfg, spec), jax.random.PRNGKey(0))
  toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 33))
  batch = {"inputs": jnp.asarray(toks[:, :-1], jnp.int32),
           "targets": jnp.asarray(toks[:, 1:], jnp.int32), "weights": jnp.ones((4, 32))}
  # lr 1e-4: an Adam step (~lr) is below half a bf16 ulp of the LoRA A entries (~0.1, ulp
  # 4.9e-4), the regime where a bf16 master copy of the adapter silently stops training.
  steps, lr = 12, 1e-4
  l32, p32 = _train(cfg, spec, params32, batch, steps, lr)
  l16, p16 = _train(cfg.replace(**BF16), spec, params32, batch, steps, lr)
  trained0, _, _ = common.split_params(params32, partition.rules_for("lora"))

  def moved(p):
    return np.concatenate([(np.asarray(a, np.float32) - np.asarray(b)).ravel() for a, b in
                           zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(trained0))])

  # bf16 compute perturbs each gradient by ~1% (8-bit mantissa); Adam's normalisation magnifies
  # that on entries whose gradient is near zero, so the fp32-adapter run's total update matches
  # the fp32 run's to ~10%. A bf16 adapter copy rounds most updates away (~60% off).
  d32 = moved(p32)
  assert np.linalg.norm(moved(p16) - d32) / np.linalg.norm(d32) < 0.25
  # Losses: the same trajectory and the same progress. The mean over 128 tokens averages the
  # bf16 logit rounding (2.4e-5 at step 0, 7e-5 by step 12), far below 1e-3; a diverging run
  # would drift by the size of the loss drop (3e-3).
  drop32, drop16 = l32[0] - l32[-1], l16[0] - l16[-1]
  assert drop32 > 0 and abs(drop16 - drop32) < 0.2 * drop32
  assert np.abs(l16 - l32).max() < 1e-3


def _dot_lines(text):
  return [ln for ln in text.splitlines()
          if "stablehlo.dot_general" in ln or "stablehlo.convolution" in ln]


def _lowered(cfg, spec, kind):
  """StableHLO text of a forward and of a jitted SFT train step (no compile, no arrays)."""
  model = Decoder(cfg, spec)
  params = _abstract_params(model)
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  fwd = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens).as_text()
  trainable, frozen, _ = common.split_params(params, _rules(kind, cfg))
  schedule = optax.constant_schedule(1e-3)
  tx = common.make_optimizer("adamw", schedule, 0.0, 1.0, 0.9, 0.999, 1e-8)
  state = jax.eval_shape(lambda: common.init_state(trainable, tx, 0))
  batch = {"inputs": tokens, "targets": tokens, "weights": jax.ShapeDtypeStruct((2, 8),
                                                                               jnp.float32)}
  step_fn = sft.make_step(model, tx, schedule)
  if cfg.head == "score":  # any loss of the scores differentiates through every dot
    loss_fn = lambda p, b, r: (model.apply({"params": p}, b["inputs"]).sum(), 1.0, {})  # noqa: E731
    step_fn = functools.partial(common.update_step, loss_fn=loss_fn, tx=tx, schedule=schedule)
  step = jax.jit(step_fn).lower(state, frozen, batch).as_text()
  return fwd, step


PRECISION_CASES = {
    **ADAPTERS,
    "full_dot_product_attention": (AdapterSpec(), "full", {"attention": "dot_product"}),
    "lora_nf4": (AdapterSpec(lora=LoraConfig(rank=4), quant=quant.QuantConfig("nf4", 64)),
                 "lora", {}),
}


@pytest.mark.parametrize("name", PRECISION_CASES)
def test_float32_compute_lowers_every_dot_at_highest(name):
  spec, kind, kw = PRECISION_CASES[name]
  for text in _lowered(get_preset("tiny", n_layers=1, **kw), spec, kind):
    dots = _dot_lines(text)
    assert len(dots) >= 4
    bad = [ln.strip() for ln in dots if "precision = [HIGHEST, HIGHEST]" not in ln]
    assert not bad, bad[:3]


@pytest.mark.parametrize("choice", ["tensorfloat32", "default"])
def test_explicit_tf32_choice_lowers_without_highest(choice):
  spec, kind, kw = ADAPTERS["lora"]
  for text in _lowered(get_preset("tiny", n_layers=1, matmul_precision=choice), spec, kind):
    dots = _dot_lines(text)
    assert dots and not [ln for ln in dots if "HIGHEST" in ln]


def test_quantized_matmul_takes_the_precision():
  w = jax.random.normal(jax.random.PRNGKey(0), (64, 64))
  cfg = quant.QuantConfig("nf4", 64)
  q = quant.quantize(w, cfg)
  x = jnp.ones((2, 64))
  for name, want in (("auto", "HIGHEST"), ("tensorfloat32", "HIGH,")):
    prec = dot_precision(name, jnp.float32)
    # The custom VJP's backward dot too: differentiate with respect to x.
    f = lambda x, q, p=prec: jax.grad(  # noqa: E731
        lambda x: quant.matmul(x, q, cfg, jnp.float32, p).sum())(x)
    dots = _dot_lines(jax.jit(f).lower(x, q).as_text())
    assert dots and all(want in ln for ln in dots)


def test_value_head_is_float32_over_bf16_base():
  from ftjax import heads
  assert heads.init_value(get_preset("tiny", **BF16))["value"].dtype == jnp.float32
