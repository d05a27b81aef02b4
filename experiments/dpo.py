"""Direct preference optimisation (sigmoid, IPO, hinge, robust/cDPO) from an SFT model.

  python experiments/dpo.py --config=configs/dpo.py --workdir=/tmp/dpo \
      --config.model.hf_path=/path/to/sft_hf --config.dpo.beta=0.1

The reference model is the same params with the adapters switched off when training adapters
(no second copy in memory), a frozen copy of the initial params for full fine-tuning, or
log-probabilities precomputed in one pass (`--config.dpo.reference=precomputed`). Logged per
step: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps of both
sides and the per-token policy-to-reference KL on chosen responses. Rerunning resumes.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from ftjax import checkpoint, cli, lora, partition  # noqa: E402
from ftjax import workdir as wd  # noqa: E402
from ftjax.data import preference as pref_data  # noqa: E402
from ftjax.errors import UserError  # noqa: E402
from ftjax.train import common, loop, preference, setup  # noqa: E402


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file (configs/dpo.py:arg).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the config, metrics and checkpoints go.")


FLAGS = flags.FLAGS
REF_KEY = "reference"  # a frozen copy of the initial params (full fine-tuning), beside the rest


def reference(model, config, params):
  """(reference model, params -> reference params, extra frozen leaves).

  The reference is the initial model. With adapters it is the same params with the adapters
  switched off, except the base leaves `adapter.train_extra` makes trainable: those move with
  training, so a frozen copy of their initial values stands in for them. Full fine-tuning keeps
  a frozen copy of everything. With `dpo.reference=precomputed` no copy is kept: the reference
  log-probs are computed once from the initial params (`precompute_reference`).
  """
  ref_model = lora.disable(model) if config.adapter.kind != "none" else model
  if config.dpo.reference == "precomputed":
    def no_params(p):
      raise AssertionError("precomputed reference: every batch carries ref_logps")
    return ref_model, no_params, {}
  moving = _moving_base_leaves(config, params)
  if not moving:
    return ref_model, (lambda p: p), {}
  # A real copy: the trainable params share these buffers and the step donates them.
  copy = {REF_KEY: traverse_util.unflatten_dict(
      {k: jnp.copy(v) for k, v in moving.items()})}

  def ref_params(p):
    flat = traverse_util.flatten_dict({k: v for k, v in p.items() if k != REF_KEY})
    flat.update(traverse_util.flatten_dict(p[REF_KEY]))
    return traverse_util.unflatten_dict(flat)
  return ref_model, ref_params, copy


def _moving_base_leaves(config, params) -> dict:
  """Flat {path: leaf} of the trainable leaves that the reference model reads: all of them for
  full fine-tuning, the `adapter.train_extra` ones beside adapters."""
  trainable = partition.split(params, partition.label_params(params, setup.rules(config)))[0]
  flat = traverse_util.flatten_dict(trainable)
  if config.adapter.kind == "none":
    return flat
  adapter_only = partition.rules_for(config.adapter.kind)
  adapter = traverse_util.flatten_dict(
      partition.split(params, partition.label_params(params, adapter_only))[0])
  return {k: v for k, v in flat.items() if k not in adapter}


def precompute_reference(ref_model, ref_params, batches, chunk: int = 0) -> dict:
  """Reference (sum, mean) logps keyed by each row's bytes: one pass before training."""
  fn = jax.jit(lambda p, b: preference.side_logps(ref_model, p, b, chunk=chunk))
  table = {}
  for batch in batches:
    sums, means = map(np.asarray, jax.device_get(fn(ref_params, batch)))
    for i in range(len(sums)):
      table[_row_key(batch, i)] = (float(sums[i]), float(means[i]))
  return table


def _row_key(batch, i):
  return batch["inputs"][i].tobytes() + batch["weights"][i].tobytes()


def attach_reference(batch: dict, table: dict) -> dict:
  vals = [table[_row_key(batch, i)] for i in range(batch["inputs"].shape[0])]
  return {**batch, "ref_logps": np.array([v[0] for v in vals], np.float32),
          "ref_logps_mean": np.array([v[1] for v in vals], np.float32)}


@wd.exclusive  # one run per workdir; a file or read-only disk is refused first
def run(config, workdir: str) -> dict:
  # ---- setup: config, model and data are checked before anything is written
  common.validate(config)
  t, d = config.train, config.dpo
  if d.reference not in ("auto", "precomputed"):
    raise UserError(f"config.dpo.reference={d.reference!r}: expected auto or precomputed")
  drift = wd.check_resume(config, workdir)  # a resume with a changed config is refused
  par = setup.parallel(config)
  par.check_batch(int(t.batch_size))
  model, params, tok, base_ref = setup.build_model(config, par=par)
  ref_model, ref_params_fn, ref_frozen = reference(model, config, params)
  trainable, frozen, labels = common.split_params(params, setup.rules(config))
  frozen = {**frozen, **ref_frozen}
  schedule, tx = setup.optimizer(config)
  state = loop.init_state(par, trainable, tx, t.seed)
  logging.info("%s", partition.format_summary(partition.summary(params, labels,
                                                                state["opt_state"])))
  # The initial params live on only for a precomputed reference, until its table is built.
  init_params = params if d.reference == "precomputed" else None
  del params, trainable

  # A fresh run reads its data now, so a bad file leaves no workdir; a resume reads it once,
  # at the restored position.
  build_data = loop.data_builder(pref_data.build_preference_dataset, config, tok, workdir)
  data = None if wd.has_checkpoints(workdir) else build_data(None)

  # ---- restore
  ckpt, state, data, start = loop.restore(workdir, t, state, base_ref, data, build_data,
                                          begin=lambda: wd.start_run(config, workdir, drift))
  logging.info("preference data: %s", data.stats)
  eval_batches = loop.eval_batches(data, t)
  table = None
  if d.reference == "precomputed":
    table = precompute_reference(ref_model, init_params,
                                 pref_data.eval_batches(data.train.examples, int(t.batch_size),
                                                        int(t.seq_len), pad_id=data.pad_id)
                                 + eval_batches, int(t.logprob_chunk))
    del init_params

  dpo_kw = dict(beta=float(d.beta), loss_type=d.loss_type,
                label_smoothing=float(d.label_smoothing), chunk=int(t.logprob_chunk))
  step_fn = par.compile(lambda axis: preference.make_dpo_step(
      model, ref_model, ref_params_fn, tx, schedule, grad_accum=int(t.grad_accum),
      axis_name=axis, **dpo_kw), state, frozen)
  eval_fn = loop.jit_eval(par, lambda tr, frz, b: preference.dpo_loss_fn(
      partition.merge(tr, frz), b, None, model=model, ref_model=ref_model,
      ref_params_fn=ref_params_fn, **dpo_kw), frozen)
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


def main(argv):
  del argv
  if FLAGS.workdir is None or FLAGS.config is None:
    raise app.UsageError("--config and --workdir are required")
  logging.info("done: %s", run(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
  cli.run(main, define_flags)
