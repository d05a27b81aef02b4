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

from ftjax import checkpoint, cli, partition  # noqa: E402
from ftjax import workdir as wd  # noqa: E402
from ftjax.data import preference as pref_data  # noqa: E402
from ftjax.errors import UserError  # noqa: E402
from ftjax.train import common, loop, preference, setup  # noqa: E402


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file (configs/reward.py:arg).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the config, metrics and checkpoints go.")


FLAGS = flags.FLAGS


@wd.exclusive  # one run per workdir; a file or read-only disk is refused first
def run(config, workdir: str) -> dict:
  # ---- setup: config, model and data are checked before anything is written
  common.validate(config)
  t, rc = config.train, config.reward
  if config.model.head != "score":
    raise UserError("config.model.head must be 'score' for a reward model")
  drift = wd.check_resume(config, workdir)  # a resume with a changed config is refused
  par = setup.parallel(config)
  par.check_batch(int(t.batch_size))
  model, params, tok, base_ref = setup.build_model(config, par=par)
  trainable, frozen, labels = common.split_params(params, setup.rules(config))
  schedule, tx = setup.optimizer(config)
  state = loop.init_state(par, trainable, tx, t.seed)
  logging.info("%s", partition.format_summary(partition.summary(params, labels,
                                                                state["opt_state"])))
  del params

  # A fresh run reads its data now, so a bad file leaves no workdir; a resume reads it once,
  # at the restored position.
  build_data = loop.data_builder(pref_data.build_preference_dataset, config, tok, workdir)
  data = None if wd.has_checkpoints(workdir) else build_data(None)

  # ---- restore
  ckpt, state, data, start = loop.restore(workdir, t, state, base_ref, data, build_data,
                                          begin=lambda: wd.start_run(config, workdir, drift))
  logging.info("preference data: %s", data.stats)
  eval_batches = loop.eval_batches(data, t)
  margin = float(rc.margin) or None
  step_fn = par.compile(lambda axis: preference.make_reward_step(
      model, tx, schedule, int(t.grad_accum), margin, float(rc.center_coef), axis_name=axis),
      state, frozen)
  eval_fn = loop.jit_eval(par, lambda tr, frz, b: preference.reward_loss_fn(
      partition.merge(tr, frz), b, None, model=model, margin=margin,
      center_coef=float(rc.center_coef)), frozen)
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


def main(argv):
  del argv
  if FLAGS.workdir is None or FLAGS.config is None:
    raise app.UsageError("--config and --workdir are required")
  logging.info("done: %s", run(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
  cli.run(main, define_flags)
