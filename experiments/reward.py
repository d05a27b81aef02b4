"""Bradley-Terry reward model: a scalar head on the decoder, trained on preference pairs.

  python experiments/reward.py --config=configs/reward.py --workdir=/tmp/rm \
      --config.model.hf_path=/path/to/hf_dir
  python experiments/export.py --workdir=/tmp/rm --out=/tmp/rm_hf   # *ForSequenceClassification

Loss -log σ(r_chosen - r_rejected - margin) (+ centring); works with LoRA and 4-bit bases (the
score head trains beside the adapter). Logged: loss, accuracy, mean rewards and margin; eval
accuracy on held-out pairs. Rerunning resumes.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ftjax import checkpoint, cli, metrics as metrics_lib, partition  # noqa: E402
from ftjax import workdir as wd  # noqa: E402
from ftjax.data import preference as pref_data  # noqa: E402
from ftjax.errors import Diverged, Interrupted, UserError  # noqa: E402
from ftjax.train import common, preference  # noqa: E402


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file (configs/reward.py:arg).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the config, metrics and checkpoints go.")


FLAGS = flags.FLAGS
def evaluate(eval_fn, trainable, batches) -> dict:
  sums, n = {}, 0.0
  for batch in batches:
    loss_sum, pairs, aux = jax.device_get(eval_fn(trainable, batch))
    n += float(pairs)
    for k, v in {"loss": loss_sum, **aux}.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {f"eval_{k}": v / max(n, 1.0) for k, v in sums.items()}


def run(config, workdir: str) -> dict:
  # ---- setup: config, model and data are checked before anything is written
  t, rc = config.train, config.reward
  if config.model.head != "score":
    raise UserError("config.model.head must be 'score' for a reward model")
  par = wd.parallel(config)
  par.check_batch(int(t.batch_size))
  model, params, tok, base_ref = wd.build_model(config, par=par)
  trainable, frozen, labels = common.split_params(params, wd.rules(config))
  schedule, tx = wd.optimizer(config)
  with par.context():
    state = jax.jit(lambda tr: common.init_state(tr, tx, int(t.seed)))(trainable)
  logging.info("%s", partition.format_summary(partition.summary(params, labels,
                                                                state["opt_state"])))
  del params

  # Each host reads its own rows of every global batch. A fresh run reads its data before
  # anything is written, so a bad file leaves no workdir; a resume reads it once, at the
  # restored position.
  def build_data(state):
    return pref_data.build_preference_dataset(wd.data_config(config), tok, int(t.seq_len),
                                              int(t.batch_size), seed=int(t.seed),
                                              state=state,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count())

  data = None if wd.has_checkpoints(workdir) else build_data(None)

  # ---- restore
  wd.save_config(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, keep=int(t.keep), async_save=bool(t.async_save),
                                 best_metric="eval_loss")
  try:
    data_state, start = None, 0
    if ckpt.latest_step() is not None:
      state, data_state, extra = ckpt.restore(target=state)
      if base_ref.get("kind") == "hf":
        checkpoint.check_base(extra, base_ref["path"])
      start = int(state["step"])
      logging.info("resumed from step %d of %s", start, workdir)
    if data is None or data_state:
      data = build_data(data_state)
  except BaseException:
    ckpt.close()  # an async checkpointer left open prints an orbax thread traceback at exit
    raise
  logging.info("preference data: %s", data.stats)
  eval_batches = data.eval_batches()
  if t.eval_batches:
    eval_batches = eval_batches[:int(t.eval_batches)]
  margin = float(rc.margin) or None
  step_fn = par.compile(lambda axis: preference.make_reward_step(
      model, tx, schedule, int(t.grad_accum), margin, float(rc.center_coef), axis_name=axis),
      state, frozen)
  eval_jit = jax.jit(lambda tr, frz, b: preference.reward_loss_fn(
      partition.merge(tr, frz), b, None, model=model, margin=margin,
      center_coef=float(rc.center_coef)))
  host_frozen = frozen

  def eval_fn(tr, b):
    with par.context():
      return eval_jit(tr, host_frozen, b)
  state, frozen = par.state(state), par.frozen(frozen)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
  bar = metrics_lib.ProgressBar(int(t.steps), initial=start)
  extra = {"base": base_ref}
  last = {}

  def save(step, eval_metrics=None):
    host = par.host_state(state)
    checkpoint.assert_finite(host, f"train state at step {step}")
    ckpt.save(step, host, data.train.state, eval_metrics, extra)

  # ---- loop
  try:
    with checkpoint.PreemptionHandler() as preempt:
      step = start
      while step < t.steps:
        batch = par.pair_batch(next(data.train), int(t.grad_accum))
        state, m = step_fn(state, frozen, batch)
        step += 1
        if step % t.log_every == 0 or step == t.steps:
          m = preference.per_pair_means(jax.device_get(par.metrics(m)))
          if not np.isfinite(m["loss"]):
            raise Diverged(f"loss is {m['loss']} at step {step}; stopping without "
                           "saving (lower optim.lr)")
          writer.write(step, m)
          bar.update(step, m)
          last = m
        eval_metrics = None
        if eval_batches and (step % t.eval_every == 0 or step == t.steps):
          eval_metrics = evaluate(eval_fn, par.host_state(state)["params"], eval_batches)
          writer.write(step, eval_metrics)
          logging.info("step %d: %s", step, eval_metrics)
          last = {**last, **eval_metrics}
        if step % t.save_every == 0 or eval_metrics is not None:
          save(step, eval_metrics)
        if preempt.any_requested():
          logging.warning("signal %s: saving step %d and exiting", preempt.signum, step)
          break
    # ---- final save
    save(step)
    ckpt.wait()
  finally:
    ckpt.close()
    bar.close()
    writer.close()
  if preempt.requested:
    raise Interrupted(preempt.signum, step, workdir)
  last["step"] = step
  return last


def main(argv):
  del argv
  if FLAGS.workdir is None or FLAGS.config is None:
    raise app.UsageError("--config and --workdir are required")
  logging.info("done: %s", run(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
  cli.run(main, define_flags)
