"""Direct preference optimisation (sigmoid, IPO, hinge, robust/cDPO) from an SFT model.

The reference model (`train/reference.py`) is the same params with the adapters switched off
when training adapters (no second copy in memory), a frozen copy of the initial params for full
fine-tuning, or log-probabilities precomputed in one pass (`dpo.reference=precomputed`).
`run(config, workdir)` is what `experiments/dpo.py` runs: logged per step are rewards/chosen,
rewards/rejected, rewards/accuracies, rewards/margins, the logps of both sides and the
per-token policy-to-reference KL on chosen responses. Batches are preference batches
(`ftjax.train.preference`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ftjax import checkpoint, heads, losses, partition
from ftjax import workdir as wd
from ftjax.data import preference as pref_data
from ftjax.errors import UserError
from ftjax.train import common, loop, preference, reference, setup

REFERENCES = ("auto", "precomputed")


def _hidden(model, params, batch, rng=None):
  """Final hidden states [2B, T, D] of the input rows."""
  seg = batch["segment_ids"]
  return model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                     mask=seg > 0, return_hidden=True,
                     rngs=None if rng is None else {"dropout": rng})


def side_logps(model, params, batch, rng=None, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Summed and mean response logprobs per row: ([2B], [2B]); `chunk` as `token_logprobs`."""
  hidden = _hidden(model, params, batch, rng)
  head = lambda h: heads.lm_logits(params, h, model.cfg)
  tok = losses.token_logprobs(hidden, head, batch["targets"], batch["weights"] != 0, chunk)
  return losses.sequence_logps_sum_and_mean(tok, batch["weights"])


def dpo_loss_fn(params, batch, rng, *, model, ref_model, ref_params_fn, beta: float,
                loss_type: str, label_smoothing: float, chunk: int = 0):
  """DPO family over one batch; returns (sum of pair losses, pairs, aux sums).

  The reference log-probabilities come from `batch["ref_logps"]` ([2B], precomputed) when
  present, else from `ref_model` on `ref_params_fn(params)`: the same params with the
  adapters switched off (no second copy of the model), or a frozen initial copy.
  """
  sums, means = side_logps(model, params, batch, rng, chunk)
  if "ref_logps" in batch:
    ref_sums, ref_means = batch["ref_logps"], batch["ref_logps_mean"]
  else:
    ref_sums, ref_means = side_logps(ref_model, jax.lax.stop_gradient(ref_params_fn(params)),
                                     batch, chunk=chunk)
    ref_sums, ref_means = jax.lax.stop_gradient(ref_sums), jax.lax.stop_gradient(ref_means)
  pol, ref = (means, ref_means) if loss_type == "ipo" else (sums, ref_sums)
  b = pol.shape[0] // 2
  per_pair, rc, rr = losses.dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], beta=beta,
                                     loss_type=loss_type, label_smoothing=label_smoothing)
  valid = preference.valid_pairs(batch)
  n_chosen = jnp.maximum(batch["weights"][:b].sum(-1), 1.0)
  aux = {**losses.dpo_metric_sums(rc, rr, sums[:b], sums[b:], valid),
         # Per-token KL(policy || reference) estimated on the chosen responses.
         "kl/chosen": jax.lax.stop_gradient(((sums[:b] - ref_sums[:b]) / n_chosen) * valid).sum()}
  return (per_pair * valid).sum(), valid.sum(), aux


def make_dpo_step(model, ref_model, ref_params_fn, tx, schedule, *, beta, loss_type,
                  label_smoothing=0.0, grad_accum=1, axis_name=None, chunk=0):
  loss_fn = functools.partial(dpo_loss_fn, model=model, ref_model=ref_model,
                              ref_params_fn=ref_params_fn, beta=beta, loss_type=loss_type,
                              label_smoothing=label_smoothing, chunk=chunk)
  return functools.partial(common.update_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                           grad_accum=grad_accum, axis_name=axis_name)


def precompute_reference(ref_model, ref_params, batches, chunk: int = 0) -> dict:
  """Reference (sum, mean) logps keyed by each row's bytes: one pass before training."""
  fn = jax.jit(lambda p, b: side_logps(ref_model, p, b, chunk=chunk))
  table = {}
  for batch in batches:
    sums, means = map(np.asarray, jax.device_get(fn(ref_params, batch)))
    for i in range(len(sums)):
      table[_row_key(batch, i)] = (float(sums[i]), float(means[i]))
  return table


def _row_key(batch, i):
  return batch["inputs"][i].tobytes() + batch["weights"][i].tobytes()


def attach_reference(batch: dict, table: dict) -> dict:
  """`batch` with its rows' precomputed reference logps (`precompute_reference`)."""
  vals = [table[_row_key(batch, i)] for i in range(batch["inputs"].shape[0])]
  return {**batch, "ref_logps": np.array([v[0] for v in vals], np.float32),
          "ref_logps_mean": np.array([v[1] for v in vals], np.float32)}


@wd.exclusive  # one run per workdir; a file or read-only disk is refused first
def run(config, workdir: str) -> dict:
  """Train; returns the last logged metrics (and eval metrics) as floats."""
  # ---- setup: config, model and data are checked before anything is written
  common.validate(config)
  t, d = config.train, config.dpo
  if d.reference not in REFERENCES:
    raise UserError(f"config.dpo.reference={d.reference!r}: expected auto or precomputed")
  drift = wd.check_resume(config, workdir)  # a resume with a changed config is refused
  par = setup.parallel(config)
  par.check_batch(int(t.batch_size))
  model, params, tok, base_ref = setup.build_model(config, par=par)
  rules = setup.rules(config)
  ref = reference.policy(model, config, params, rules,
                         precomputed=d.reference == "precomputed")
  state, frozen, schedule, tx, _ = loop.init(config, par, params, rules)
  frozen = {**frozen, **ref.frozen}
  # The initial params live on only for a precomputed reference, until its table is built.
  init_params = params if d.reference == "precomputed" else None
  del params
  build_data = loop.data_builder(pref_data.build_preference_dataset, config, tok, workdir)

  # ---- restore (a fresh run reads its data first, so a bad file leaves no workdir)
  ckpt, state, data, start = loop.restore(workdir, t, state, base_ref, build_data,
                                          begin=lambda: wd.start_run(config, workdir, drift))
  logging.info("preference data: %s", data.stats)
  eval_batches = loop.eval_batches(data, t)
  table = None
  if d.reference == "precomputed":
    table = precompute_reference(ref.model, init_params,
                                 pref_data.eval_batches(data.train.examples, int(t.batch_size),
                                                        int(t.seq_len), pad_id=data.pad_id)
                                 + eval_batches, int(t.logprob_chunk))
    del init_params

  dpo_kw = dict(beta=float(d.beta), loss_type=d.loss_type,
                label_smoothing=float(d.label_smoothing), chunk=int(t.logprob_chunk))
  step_fn = par.compile(lambda axis: make_dpo_step(
      model, ref.model, ref.params_fn, tx, schedule, grad_accum=int(t.grad_accum),
      axis_name=axis, **dpo_kw), state, frozen)
  eval_fn = loop.jit_eval(par, lambda tr, frz, b: dpo_loss_fn(
      partition.merge(tr, frz), b, None, model=model, ref_model=ref.model,
      ref_params_fn=ref.params_fn, **dpo_kw), frozen)
  prep = (lambda b: attach_reference(b, table)) if table is not None else (lambda b: b)
  eval_batches = [prep(b) for b in eval_batches]
  state, frozen = par.state(state), par.frozen(frozen)
  writer, bar = loop.open_logs(workdir, t.steps, start)
  extra = {"base": base_ref}
  last = {}

  def save(step, eval_metrics=None):
    ckpt.save(step, par.host_state(state), data.train.state, eval_metrics, extra)

  def run_eval():
    return loop.evaluate(eval_fn, par.host_state(state)["params"], eval_batches)

  # ---- loop
  with loop.closing(ckpt, bar, writer):
    with checkpoint.PreemptionHandler() as preempt:
      step = start
      while step < t.steps:
        batch = par.pair_batch(prep(next(data.train)), int(t.grad_accum))
        state, m = step_fn(state, frozen, batch)
        step += 1
        if loop.due(step, t.log_every, t.steps):
          m = preference.per_pair_means(jax.device_get(par.metrics(m)))
          last = loop.log(step, m, writer, bar, hint="lower optim.lr or dpo.beta")
        eval_metrics = loop.eval_and_save(step, t, eval_batches, run_eval, writer, save)
        last = {**last, **(eval_metrics or {})}
        if loop.stop_requested(preempt, step):
          break
    # ---- final save
    save(step)
    ckpt.wait()
  return loop.finish(preempt, step, workdir, last)
