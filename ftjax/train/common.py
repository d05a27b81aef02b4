"""Pieces every training loop shares: optimizer and schedule, train state, the update step.

The train state is a plain dict (easy to checkpoint with orbax and to shard):
  {"step": int32 [], "params": trainable params, "opt_state": optax state, "rng": key}
Frozen params (the base model under adapters) live outside it, are never differentiated and
hold no optimizer state.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import offload, partition
from ftjax.errors import UserError

OPTIMIZERS = ("adamw", "adam", "lion", "sgd", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")
# train.<key>: the least value that means something (0 for "none" or "all", 1 for a count or a
# period: a step every 0 steps divides by zero).
TRAIN_MINIMUMS = {"steps": 1, "batch_size": 1, "seq_len": 1, "grad_accum": 1, "log_every": 1,
                  "eval_every": 1, "save_every": 1, "keep": 1, "eval_batches": 0,
                  "early_stop_patience": 0, "logprob_chunk": 0}


def _get(section, key, default=None):
  return section.get(key, default) if hasattr(section, "get") else getattr(section, key, default)


def _int_at_least(where: str, value, least: int):
  if isinstance(value, bool) or not isinstance(value, int) or value < least:
    allowed = "an integer >= 1" if least == 1 else f"an integer >= {least}"
    raise UserError(f"config.{where}={value!r}: expected {allowed}")


def validate(config):
  """The train, optim and model keys every trainer shares, checked before anything is built or
  written: a UserError naming the key and what it may be. A run's own section (dpo, grpo, ppo)
  is its script's to check."""
  from ftjax.config import ATTENTIONS, DTYPES, REMAT_POLICIES
  t = config.train
  for key, least in TRAIN_MINIMUMS.items():
    if _get(t, key) is not None:
      _int_at_least(f"train.{key}", _get(t, key), least)
  o = config.optim
  if o.name not in OPTIMIZERS:
    raise UserError(f"config.optim.name={o.name!r}: expected one of {', '.join(OPTIMIZERS)}")
  if o.schedule not in SCHEDULES:
    raise UserError(f"config.optim.schedule={o.schedule!r}: expected one of "
                    f"{', '.join(SCHEDULES)}")
  # lr <= 0 trains by gradient ascent or not at all, and exits 0.
  if isinstance(o.lr, bool) or not isinstance(o.lr, (int, float)) or not (
      math.isfinite(o.lr) and o.lr > 0):
    raise UserError(f"config.optim.lr={o.lr!r}: expected a number > 0")
  _int_at_least("optim.warmup_steps", o.warmup_steps, 0)
  ratio = _get(o, "min_lr_ratio", 0.0)
  if not 0.0 <= float(ratio) <= 1.0:
    raise UserError(f"config.optim.min_lr_ratio={ratio!r}: expected a fraction in [0, 1]")
  mode = offload.check(_get(t, "offload", "none"))
  if mode != "none" and _get(config, "parallel", "pjit") != "pjit":
    raise UserError(f"config.train.offload={mode!r} needs config.parallel='pjit' (memory kinds "
                    "are shardings)")
  mpl = _get(_get(config, "data", {}), "max_prompt_length")
  if mpl is not None:  # preference data: 0 is half of seq_len
    _int_at_least("data.max_prompt_length", mpl, 0)
  m = config.model
  for key, allowed in (("dtype", DTYPES), ("compute_dtype", ("",) + DTYPES),
                       ("attention", ATTENTIONS), ("remat", REMAT_POLICIES)):
    value = _get(m, key)
    if value is not None and not isinstance(value, bool) and value not in allowed:
      shown = ", ".join(repr(a) if a == "" else a for a in allowed)
      raise UserError(f"config.model.{key}={value!r}: expected one of {shown}")


class Schedule:
  """Linear warmup from 0 to `lr`, then cosine, linear or constant decay to lr * min_lr_ratio:
  an optax schedule (`schedule(count) -> lr`) whose numbers can be inputs of the compiled step.

  With its numbers as Python constants, two runs that differ only in train.steps, optim.lr or
  the warmup length would compile different train steps (a compile of several seconds to a
  minute per run; a resume or a sweep recompiles the same program with new constants).
  `sharding.Parallel.compile` passes `values` as an argument of the step and traces the step
  under `bound(values)`, so that the program is the same for any numbers and the persistent
  compilation cache serves it. The kind is one of the numbers too (all three are computed, one
  is selected).

  The formulas are optax's `cosine_decay_schedule`, `linear_schedule` and `join_schedules`,
  op for op, with the constants that optax (1 - alpha, end - init) and XLA fold folded on the
  host the same way: XLA computes optax's `pi * count / decay_steps` with constants as
  `count * (f32(pi) * f32(1 / decay_steps))`, which is not always the float of the division. So
  the values are the float32 ones of the schedules before, bound or not (tests/test_schedule.py
  compares them bitwise).
  """

  def __init__(self, lr: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine",
               min_lr_ratio: float = 0.0):
    if kind not in SCHEDULES:
      raise UserError(f"config.optim.schedule={kind!r}: expected one of {', '.join(SCHEDULES)}")
    decay_steps = max(1, total_steps - warmup_steps)
    end = lr * min_lr_ratio
    self.kind = kind
    f32, i32 = np.float32, np.int32
    self.values = {
        "kind": i32(SCHEDULES.index(kind)),
        "lr": f32(lr), "warmup_steps": i32(max(warmup_steps, 0)),
        "neg_lr": f32(0.0 - lr),  # warmup: (init - end) with init 0
        "decay_steps_f": f32(float(decay_steps)), "decay_steps": i32(decay_steps),
        "pi_over_decay": f32(np.pi) * (f32(1) / f32(float(decay_steps))),
        "one_minus_alpha": f32(1 - min_lr_ratio), "alpha": f32(min_lr_ratio),
        "lr_minus_end": f32(lr - end), "end": f32(end)}
    self._bound = None

  @contextlib.contextmanager
  def bound(self, values: dict):
    """While tracing a step: `values` (its traced argument) stand for the numbers."""
    was, self._bound = self._bound, values
    try:
      yield
    finally:
      self._bound = was

  def __call__(self, count):
    v = self.values if self._bound is None else self._bound
    # optax.join_schedules([linear_schedule(0, lr, warmup), decay], [warmup]). With no warmup
    # the decay is selected at every count (count - 0 is count): one program for both.
    warm = jnp.clip(count - 0, 0, v["warmup_steps"])
    warm = v["neg_lr"] * (1 - warm / v["warmup_steps"]) ** 1 + v["lr"]
    return jnp.where(count < v["warmup_steps"], warm, self._decay(count - v["warmup_steps"], v))

  @staticmethod
  def _decay(count, v):
    # All three kinds, one selected (exactly its value): one program for any kind.
    # optax.cosine_decay_schedule(lr, decay_steps, alpha):
    c = jnp.minimum(count, v["decay_steps_f"])
    cosine_decay = 0.5 * (1 + jnp.cos(c * v["pi_over_decay"]))
    cosine = v["lr"] * (v["one_minus_alpha"] * cosine_decay ** 1.0 + v["alpha"])
    # optax.linear_schedule(lr, end, decay_steps):
    c = jnp.clip(count - 0, 0, v["decay_steps"])
    linear = v["lr_minus_end"] * (1 - c / v["decay_steps"]) ** 1 + v["end"]
    return jnp.where(v["kind"] == 0, cosine, jnp.where(v["kind"] == 1, linear, v["lr"]))


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine",
                  min_lr_ratio: float = 0.0) -> Schedule:
  """Linear warmup from 0 to `lr`, then cosine, linear or constant decay to lr * min_lr_ratio."""
  return Schedule(float(lr), int(total_steps), int(warmup_steps), kind, float(min_lr_ratio))


def _decay_mask(params):
  # Weight decay on matrices only (kernels, LoRA factors); not on norms, biases, scalars.
  # Under scanned layers (`layers/...`) the leading [L] axis does not count.
  def decays(path, x):
    stacked = bool(path) and getattr(path[0], "key", None) == "layers"
    return getattr(x, "ndim", 0) - stacked >= 2
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(name: str, schedule: optax.Schedule, weight_decay: float = 0.0,
                   clip: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                   ) -> optax.GradientTransformation:
  """adamw | adam | lion | sgd | adafactor, with optional global-norm clipping first."""
  if name == "adamw":
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=_decay_mask)
  elif name == "adam":
    tx = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  elif name == "lion":
    tx = optax.lion(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=_decay_mask)
  elif name == "sgd":
    tx = optax.sgd(schedule, momentum=b1 if b1 else None)
  elif name == "adafactor":
    tx = optax.adafactor(schedule, weight_decay_rate=weight_decay or None)
  else:
    raise UserError(f"config.optim.name={name!r}: expected one of {', '.join(OPTIMIZERS)}")
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


def init_state(trainable: dict, tx: optax.GradientTransformation, seed: int) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "params": trainable,
          "opt_state": tx.init(trainable), "rng": jax.random.PRNGKey(seed)}


def split_params(params: dict, rules) -> tuple[dict, dict, Any]:
  """(trainable, frozen, labels) by ordered path-regex rules (see partition.py)."""
  labels = partition.label_params(params, rules)
  trainable, frozen = partition.split(params, labels)
  return trainable, frozen, labels


def _norm(tree) -> jax.Array:
  return optax.global_norm(tree)


def update_step(state: dict, frozen: dict, batch: dict, *,
                loss_fn: Callable[[dict, dict, jax.Array], tuple[jax.Array, jax.Array, dict]],
                tx: optax.GradientTransformation, schedule: optax.Schedule,
                grad_accum: int = 1, axis_name: Optional[str] = None) -> tuple[dict, dict]:
  """One optimizer step over `grad_accum` micro-batches; pure, jit it with donate_argnums=0.

  `loss_fn(params, batch, rng) -> (loss_sum, n_targets, aux)` sees the full params tree
  (trainable merged over frozen). Gradients of the summed loss are accumulated over the
  micro-batches and divided once by the total target count: k micro-batches give the same
  update as one batch k times larger. Under `jax.pmap`, `axis_name` sums them (and the
  counts) over devices first, so the update equals the single-device one.
  """
  rng = jax.random.fold_in(state["rng"], state["step"])

  def grads_of(mb, key):
    def f(trainable):
      loss_sum, n, aux = loss_fn(partition.merge(trainable, frozen), mb, key)
      return loss_sum, (n, aux)
    (loss_sum, (n, aux)), g = jax.value_and_grad(f, has_aux=True)(state["params"])
    return loss_sum, n, aux, g

  if grad_accum == 1:
    loss_sum, n, aux, grads = grads_of(batch, rng)
  else:
    micro = jax.tree_util.tree_map(
        lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

    def body(carry, xs):
      mb, i = xs
      loss_sum, n, aux, g = grads_of(mb, jax.random.fold_in(rng, i))
      acc_l, acc_n, acc_aux, acc_g = carry
      return (acc_l + loss_sum, acc_n + n, jax.tree_util.tree_map(jnp.add, acc_aux, aux),
              jax.tree_util.tree_map(jnp.add, acc_g, g)), None

    zeros_g = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
    aux0 = jax.eval_shape(lambda: grads_of(jax.tree_util.tree_map(lambda x: x[0], micro),
                                           rng)[2])
    zeros_aux = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros_aux, zeros_g)
    (loss_sum, n, aux, grads), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
  if axis_name is not None:
    loss_sum, n, aux, grads = jax.lax.psum((loss_sum, n, aux, grads), axis_name)
  denom = jnp.maximum(n, 1.0)
  grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
  # train.offload=optimizer: the state arrives in pinned host memory and goes back there; it
  # is moved in here, after the backward pass, so it is never on the device beside activations.
  opt_in = offload.to_device(state["opt_state"])
  updates, opt_state = tx.update(grads, opt_in, state["params"])
  opt_state = offload.like(opt_state, state["opt_state"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {"loss": loss_sum / denom, "target_tokens": n, "grad_norm": _norm(grads),
             "update_norm": _norm(updates), "param_norm": _norm(params),
             "lr": schedule(state["step"]), **aux}
  new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
               "rng": state["rng"]}
  return new_state, metrics
