"""Bradley-Terry reward model: a scalar head on the decoder, trained on preference pairs.

Loss -log σ(r_chosen - r_rejected - margin) (+ centring); works with LoRA and 4-bit bases (the
score head trains beside the adapter). `run(config, workdir)` is what `experiments/reward.py`
runs: logged are loss, accuracy, mean rewards and margin, and the accuracy on held-out pairs.
Batches are preference batches (`ftjax.train.preference`).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from absl import logging

from ftjax import checkpoint, heads, losses, partition
from ftjax import workdir as wd
from ftjax.data import preference as pref_data
from ftjax.errors import UserError
from ftjax.train import common, loop, preference, setup


def full_sequences(batch: dict) -> tuple[jax.Array, jax.Array]:
  """The whole token rows [2B, T+1] and their mask, EOS included (inputs drop the last token)."""
  n = (batch["segment_ids"] > 0).sum(-1)  # [2B] input length = sequence length - 1
  rows = jnp.arange(batch["inputs"].shape[0])
  last = jnp.take_along_axis(batch["targets"], jnp.maximum(n - 1, 0)[:, None], -1)[:, 0]
  tokens = jnp.concatenate([batch["inputs"], jnp.zeros_like(batch["inputs"][:, :1])], axis=1)
  tokens = tokens.at[rows, n].set(last)
  mask = jnp.arange(tokens.shape[1])[None, :] <= n[:, None]
  return tokens, mask


def rewards_of(model, params, batch: dict, rng=None) -> jax.Array:
  """Scalar reward per row [2B], read where HF's classifiers read it (`heads.sequence_score`)."""
  tokens, mask = full_sequences(batch)
  hidden = model.apply({"params": params}, tokens, mask=mask, return_hidden=True,
                       rngs=None if rng is None else {"dropout": rng})  # [2B, T+1, D]
  return heads.sequence_score(params, hidden, tokens, mask, model.cfg)


def reward_loss_fn(params, batch, rng, *, model, margin: Optional[float] = None,
                   center_coef: float = 0.0):
  """Bradley-Terry: -log σ(r_chosen - r_rejected - margin); returns (sum, pairs, aux sums)."""
  r = rewards_of(model, params, batch, rng)
  b = r.shape[0] // 2
  rc, rr = r[:b], r[b:]
  valid = preference.valid_pairs(batch)
  per_pair = losses.bradley_terry_losses(rc, rr, margin, center_coef)
  aux = losses.bradley_terry_metric_sums(rc, rr, valid)
  return (per_pair * valid).sum(), valid.sum(), aux


def make_reward_step(model, tx, schedule, grad_accum=1, margin=None, center_coef=0.0,
                     axis_name=None):
  loss_fn = functools.partial(reward_loss_fn, model=model, margin=margin,
                              center_coef=center_coef)
  return functools.partial(common.update_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                           grad_accum=grad_accum, axis_name=axis_name)


@wd.exclusive  # one run per workdir; a file or read-only disk is refused first
def run(config, workdir: str) -> dict:
  """Train; returns the last logged metrics (and eval metrics) as floats."""
  # ---- setup: config, model and data are checked before anything is written
  common.validate(config)
  t, rc = config.train, config.reward
  if config.model.head != "score":
    raise UserError("config.model.head must be 'score' for a reward model")
  drift = wd.check_resume(config, workdir)  # a resume with a changed config is refused
  par = setup.parallel(config)
  par.check_batch(int(t.batch_size))
  model, params, tok, base_ref = setup.build_model(config, par=par)
  state, frozen, schedule, tx, _ = loop.init(config, par, params, setup.rules(config))
  del params
  build_data = loop.data_builder(pref_data.build_preference_dataset, config, tok, workdir)

  # ---- restore (a fresh run reads its data first, so a bad file leaves no workdir)
  ckpt, state, data, start = loop.restore(workdir, t, state, base_ref, build_data,
                                          begin=lambda: wd.start_run(config, workdir, drift))
  logging.info("preference data: %s", data.stats)
  eval_batches = loop.eval_batches(data, t)
  margin = float(rc.margin) or None
  step_fn = par.compile(lambda axis: make_reward_step(
      model, tx, schedule, int(t.grad_accum), margin, float(rc.center_coef), axis_name=axis),
      state, frozen, schedule)
  eval_fn = loop.jit_eval(par, lambda tr, frz, b: reward_loss_fn(
      partition.merge(tr, frz), b, None, model=model, margin=margin,
      center_coef=float(rc.center_coef)), frozen)
  state, frozen = par.state(state), par.frozen(frozen)
  writer, bar = loop.open_logs(workdir, t.steps, start)
  extra = {"base": base_ref}
  last = {}

  def save(step, eval_metrics=None):
    ckpt.save(step, par.host_state(state), data.train.state, eval_metrics, extra)

  def run_eval():
    return loop.evaluate(eval_fn, par.host_state(state)["params"], eval_batches,
                         rates=("accuracy",))

  # ---- loop
  with loop.closing(ckpt, bar, writer):
    with checkpoint.PreemptionHandler() as preempt:
      step = start
      while step < t.steps:
        batch = par.pair_batch(next(data.train), int(t.grad_accum))
        state, m = step_fn(state, frozen, batch)
        step += 1
        if loop.due(step, t.log_every, t.steps):
          m = preference.per_pair_means(jax.device_get(par.metrics(m)))
          last = loop.log(step, m, writer, bar, hint="lower optim.lr")
        eval_metrics = loop.eval_and_save(step, t, eval_batches, run_eval, writer, save)
        last = {**last, **(eval_metrics or {})}
        if loop.stop_requested(preempt, step):
          break
    # ---- final save
    save(step)
    ckpt.wait()
  return loop.finish(preempt, step, workdir, last)
