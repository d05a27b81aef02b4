"""The learning-rate schedule: optax's values, bitwise, whether its numbers are constants of the
step or inputs of it; and one compiled step for runs that differ only in those numbers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax._src import monitoring

from ftjax import sharding
from ftjax.train import common

CASES = [  # (lr, steps, warmup, kind, min_lr_ratio)
    (1e-3, 4, 0, "cosine", 0.0), (3e-4, 30, 5, "cosine", 0.1), (2e-2, 25, 2, "cosine", 0.0),
    (1e-3, 7, 0, "linear", 0.0), (7e-5, 19, 3, "linear", 0.25), (1e-5, 1000, 0, "constant", 0.0),
    (3e-3, 11, 4, "constant", 0.0), (1e-3, 3, 5, "cosine", 0.0), (1e-3, 1000, 0, "cosine", 0.0),
    (2e-5, 60, 3, "cosine", 0.1)]


def optax_schedule(lr, steps, warmup, kind, ratio):
  """What ftjax built before its schedule took traced numbers: optax's own schedules."""
  decay_steps = max(1, steps - warmup)
  decay = {"cosine": lambda: optax.cosine_decay_schedule(lr, decay_steps, alpha=ratio),
           "linear": lambda: optax.linear_schedule(lr, lr * ratio, decay_steps),
           "constant": lambda: optax.constant_schedule(lr)}[kind]()
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def test_values_equal_optax_bitwise_as_constants_and_as_inputs(xla_default_compiler):
  counts = jnp.arange(0, 1003, dtype=jnp.int32)
  for case in CASES:
    ref = np.asarray(jax.jit(jax.vmap(optax_schedule(*case)))(counts), np.float32)
    ours = common.make_schedule(*case)
    const = np.asarray(jax.jit(jax.vmap(ours))(counts), np.float32)

    @jax.jit
    def traced(numbers, ours=ours):
      with ours.bound(numbers):
        return jax.vmap(ours)(counts)
    np.testing.assert_array_equal(const, ref, err_msg=str(case))
    np.testing.assert_array_equal(np.asarray(traced(ours.values), np.float32), ref,
                                  err_msg=str(case))


@pytest.mark.parametrize("mode", ["pjit", "pmap"])
def test_runs_differing_in_steps_and_lr_share_one_compiled_step(mode):
  """Parallel.compile takes the schedule's numbers as an input: the second optimizer (other
  lr, steps, warmup, kind and floor) loads the first one's program from the persistent cache, and
  each still follows its own schedule and update (optax's, with the numbers as constants)."""
  par = sharding.Parallel(mode)
  n = par.n_batch_shards
  x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)

  def loss_fn(params, batch, rng):
    return jnp.sum((batch["x"] @ params["w"]) ** 2), jnp.float32(batch["x"].shape[0]), {}

  misses = []
  monitoring.register_event_listener(
      lambda name, **kw: misses.append(name) if name.endswith("cache_misses") else None)
  for i, case in enumerate([(1e-2, 5, 2, "cosine", 0.0), (3e-2, 9, 0, "linear", 0.1)]):
    schedule = common.make_schedule(*case)
    tx = common.make_optimizer("adamw", schedule, weight_decay=0.01)
    state = common.init_state({"w": jnp.ones((3, 2), jnp.float32) * 0.5}, tx, 0)
    # The update optax makes with the numbers as constants, one step at a time.
    ref_sched = optax_schedule(*case)
    ref_tx = common.make_optimizer("adamw", ref_sched, weight_decay=0.01)
    ref_state = common.init_state({"w": jnp.ones((3, 2), jnp.float32) * 0.5}, ref_tx, 0)
    ref_step = jax.jit(functools.partial(common.update_step, frozen={}, loss_fn=loss_fn,
                                         tx=ref_tx, schedule=ref_sched))
    if mode == "pjit":
      state = jax.device_put(state, sharding.replicated(par.mesh))
    step = par.compile(lambda axis, tx=tx, schedule=schedule: lambda s, f, b: common.update_step(
        s, f, b, loss_fn=loss_fn, tx=tx, schedule=schedule, axis_name=axis),
        state, {}, schedule)
    state = par.state(state)
    for k in range(3):
      before = len(misses)
      state, m = step(state, {}, par.batch({"x": x}))
      if i == 1 and k == 0:  # the step's program is the first case's: not compiled again
        assert misses[before:] == []
      ref_state, ref_m = ref_step(ref_state, batch={"x": x})
      assert float(par.metrics(m)["lr"]) == float(ref_m["lr"])
    np.testing.assert_allclose(par.host_state(state)["params"]["w"], ref_state["params"]["w"],
                               rtol=1e-6)
