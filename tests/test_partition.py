"""Trainable/frozen partition: labels, gradients and optimizer state only where trainable;
a short toy training run lowers the loss for every adapter kind."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ftjax
from ftjax import partition
from ftjax.train import common, sft


def _batch(seed=0, b=4, t=16):
  rng = np.random.default_rng(seed)
  seq = rng.integers(6, 320, (b, t + 1)).astype(np.int32)
  return {"inputs": jnp.asarray(seq[:, :-1]), "targets": jnp.asarray(seq[:, 1:]),
          "weights": jnp.ones((b, t), jnp.float32)}


def test_labels_follow_ordered_rules(hf_models):
  _, params = ftjax.load_pretrained(hf_models["llama"][0], lora=ftjax.LoraConfig(rank=2))
  labels = partition.label_params(params, partition.rules_for("lora"))
  assert labels["layers"]["attn"]["q_proj"]["lora_a"] == "train"
  assert labels["layers"]["attn"]["q_proj"]["kernel"] == "freeze"
  assert labels["embed"] == "freeze"
  # Extra rules come first: also train the final norm.
  labels = partition.label_params(params, partition.rules_for("lora", [("final_norm", "train")]))
  assert labels["final_norm"]["scale"] == "train"
  with pytest.raises(ValueError, match="matches no partition rule"):
    partition.label_params(params, [("lora_", "train")])
  with pytest.raises(ValueError, match="no param is trainable"):
    partition.label_params(params, partition.rules_for("none"))
  with pytest.raises(ValueError, match="unknown trainable-parameter rule set"):
    partition.rules_for("loraa")


def test_grads_and_optimizer_state_only_for_trainable(hf_models):
  model, params = ftjax.load_pretrained(hf_models["llama"][0], quant="nf4",
                                        lora=ftjax.LoraConfig(rank=2, targets="qv"))
  trainable, frozen, labels = common.split_params(params, partition.rules_for("lora"))
  flat = jax.tree_util.tree_leaves_with_path(trainable)
  assert flat and all(str(p[-1].key).startswith("lora_") for p, _ in flat)
  # The gradient tree is the trainable tree: no frozen leaf is differentiated.
  loss = lambda tr: sft.sft_loss_fn(partition.merge(tr, frozen), _batch(), None, model=model)[0]
  grads = jax.grad(loss)(trainable)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
  # B = 0 at init: A gets no gradient yet, B does.
  g = grads["layers"]["attn"]["q_proj"]
  assert not np.any(g["lora_a"]) and np.any(g["lora_b"])
  # The optimizer state covers the trainable tree only: adam's mu and nu, plus the count.
  state = common.init_state(trainable, optax.adam(1e-3), 0)["opt_state"]
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(state))
  n_train = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
  assert n_state == 2 * n_train + 1
  s = partition.summary(params, labels, state)
  assert s["trainable"] == n_train and 0 < s["percent"] < 5
  assert "trainable params" in partition.format_summary(s)


KINDS = {
    "full": dict(),
    "lora": dict(lora=ftjax.LoraConfig(rank=4, alpha=8)),
    "dora": dict(lora=ftjax.LoraConfig(rank=4, alpha=8, dora=True)),
    "prefix": dict(prefix=ftjax.PrefixConfig(length=4, reparam=True, reparam_hidden=32)),
    "prompt": dict(prefix=ftjax.PrefixConfig(kind="prompt", length=4, init_std=0.5)),
    "lora_nf4": dict(lora=ftjax.LoraConfig(rank=4, alpha=8), quant="nf4"),
    "lora_int4": dict(lora=ftjax.LoraConfig(rank=4, alpha=8), quant="int4"),
}
RULES = {"full": "full", "lora": "lora", "dora": "lora", "prefix": "prefix", "prompt": "prompt",
         "lora_nf4": "lora", "lora_int4": "lora"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_short_training_lowers_loss(hf_models, kind):
  model, params = ftjax.load_pretrained(hf_models["qwen2"][0], **KINDS[kind])
  trainable, frozen, _ = common.split_params(params, partition.rules_for(RULES[kind]))
  # Prompt/prefix tuning take high rates (Lester et al. use 0.3).
  lr = {"full": 3e-3, "prefix": 1e-1, "prompt": 1e-1}.get(kind, 2e-2)
  schedule = common.make_schedule(lr, 25, warmup_steps=2)
  tx = common.make_optimizer("adamw", schedule, clip=1.0)
  state = common.init_state(trainable, tx, seed=0)
  step = jax.jit(sft.make_step(model, tx, schedule), donate_argnums=0)
  batch = _batch(1)
  losses = []
  for _ in range(25):
    state, m = step(state, frozen, batch)
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all()
  # Prompt tuning steers a frozen model through 4 input vectors only: slower on this
  # memorisation task (measured 6.14 -> 5.28 in 25 steps), so a looser bar.
  bar = 0.9 if kind == "prompt" else 0.8
  assert losses[-1] < bar * losses[0], (kind, losses[0], losses[-1])


def test_grad_accumulation_equals_big_batch(hf_models):
  model, params = ftjax.load_pretrained(hf_models["llama"][0], lora=ftjax.LoraConfig(rank=2))
  trainable, frozen, _ = common.split_params(params, partition.rules_for("lora"))
  schedule = common.make_schedule(1e-2, 10)
  tx = common.make_optimizer("adamw", schedule)
  batch = _batch(2, b=4)
  # Unequal target counts per micro-batch: the normalisation must use the total.
  w = np.ones((4, 16), np.float32)
  w[0, :10] = 0
  w[3, 5:] = 0
  batch["weights"] = jnp.asarray(w)
  out = {}
  for k in (1, 2, 4):
    step = jax.jit(sft.make_step(model, tx, schedule, grad_accum=k))
    state, m = step(common.init_state(trainable, tx, 0), frozen, batch)
    out[k] = (state, m)
  for k in (2, 4):
    np.testing.assert_allclose(out[k][1]["loss"], out[1][1]["loss"], rtol=1e-5)
    np.testing.assert_allclose(out[k][1]["grad_norm"], out[1][1]["grad_norm"], rtol=1e-4)
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, atol=1e-6),
                           out[k][0]["params"], out[1][0]["params"])
