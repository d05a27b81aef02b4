"""Supervised fine-tuning and continued pretraining.

  python experiments/sft.py --config=configs/sft.py:adapter=lora --workdir=/tmp/sft \
      --config.model.hf_path=/path/to/hf_dir --config.data.path=train.jsonl

Rerunning the same command on the same workdir resumes from the latest checkpoint, exactly.
SIGTERM (preemption) or SIGINT (Ctrl-C) saves a checkpoint and exits non-zero with a line
saying how to resume; config, model and data are checked before anything is written to the
workdir. The loop reads top to bottom: setup, restore, loop (step, log, eval, save), final save.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ftjax import cli  # noqa: E402
from ftjax import checkpoint, data as data_lib, metrics as metrics_lib, partition  # noqa: E402
from ftjax import workdir as wd  # noqa: E402
from ftjax.errors import UserError  # noqa: E402
from ftjax.train import common, loop, sft, setup  # noqa: E402


def define_flags():
  """Flags exist only when run as a script, so that tests and demo.py can import
  several experiment modules into one process without flag clashes."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/sft.py:arg).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the config, metrics and checkpoints go.")


FLAGS = flags.FLAGS

def evaluate(eval_fn, params, batches) -> dict:
  """Held-out loss and perplexity over whole eval batches (sum over tokens / tokens)."""
  loss_sum, n = 0.0, 0.0
  for batch in batches:
    out = jax.device_get(eval_fn(params, batch))
    loss_sum += float(out["loss_sum"])
    n += float(out["target_tokens"])
  loss = loss_sum / max(n, 1.0)
  return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0))), "eval_tokens": n}


@wd.exclusive  # one run per workdir; a file or read-only disk is refused first
def run(config, workdir: str) -> dict:
  """Train; returns the last logged metrics (and eval metrics) as floats."""
  # ---- setup: config, model and data are checked before anything is written
  common.validate(config)
  t = config.train
  if t.batch_size % t.grad_accum:
    raise UserError(f"config.train.batch_size={t.batch_size} is not divisible by "
                    f"config.train.grad_accum={t.grad_accum}")
  if config.adapter.kind == "prompt" and config.data.packing:
    raise UserError("config.data.packing must be False with prompt tuning (the soft prompt "
                    "precedes each row, not each packed example)")
  drift = wd.check_resume(config, workdir)  # a resume with a changed config is refused
  par = setup.parallel(config)
  par.check_batch(int(t.batch_size))
  if par.mode == "pmap" and t.batch_size // par.n_batch_shards % t.grad_accum:
    raise UserError("config.train.batch_size / devices must divide by config.train.grad_accum")
  model, params, tok, base_ref = setup.build_model(config, par=par)
  trainable, frozen, labels = common.split_params(params, setup.rules(config))
  del params
  schedule, tx = setup.optimizer(config)
  state = loop.init_state(par, trainable, tx, t.seed)
  logging.info("model %s (%s), adapter %s, quant %s", model.cfg.family,
               config.model.hf_path or config.model.preset, config.adapter.kind,
               config.quant.kind)
  summary = partition.summary(partition.merge(trainable, frozen), labels, state["opt_state"])
  logging.info("%s", partition.format_summary(summary))
  # A fresh run reads its data now, so a bad file leaves no workdir; a resume reads it once,
  # at the restored position.
  build_data = loop.data_builder(data_lib.build_dataset, config, tok, workdir)
  data = None if wd.has_checkpoints(workdir) else build_data(None)

  # ---- restore
  ckpt, state, data, start = loop.restore(workdir, t, state, base_ref, data, build_data,
                                          begin=lambda: wd.start_run(config, workdir, drift))
  logging.info("train data: %s", data.stats)
  eval_batches = loop.eval_batches(data, t)

  chunk = int(t.logprob_chunk)
  step_fn = par.compile(lambda axis: sft.make_step(model, tx, schedule, int(t.grad_accum), axis,
                                                   chunk), state, frozen)
  eval_fn = loop.jit_eval(par, lambda trainable, frz, batch: sft.eval_step(
      partition.merge(trainable, frz), batch, model=model, chunk=chunk), frozen)
  # Counted on the host trees: under pmap, par.state adds a device axis to every leaf.
  throughput = metrics_lib.Throughput(flops_per_token=metrics_lib.train_flops_per_token(
      model.cfg, int(t.seq_len), state["params"], frozen))
  state, frozen = par.state(state), par.frozen(frozen)
  writer, bar = loop.open_logs(workdir, t.steps, start)
  extra = {"base": base_ref, "summary": summary}
  stopper, last = loop.EarlyStop(t.early_stop_patience), {}

  def save(step, eval_metrics=None):
    ckpt.save(step, par.host_state(state), data.train.state, eval_metrics, extra)

  def run_eval():
    return evaluate(eval_fn, par.host_state(state)["params"], eval_batches)

  # ---- loop (the checkpointer, writer and bar are closed on any exit: no half-written save)
  with loop.closing(ckpt, bar, writer):
    with checkpoint.PreemptionHandler() as preempt:
      step, tokens = start, 0  # tokens since the last log
      while step < t.steps:
        batch = next(data.train)
        tokens += int(batch["weights"].size) * jax.process_count()
        state, m = step_fn(state, frozen, par.batch(batch))
        step += 1
        if loop.due(step, t.log_every, t.steps):
          m = {k: float(v) for k, v in jax.device_get(par.metrics(m)).items()}
          m.update(throughput.update(tokens))
          tokens = 0
          last = loop.log(step, m, writer, bar, hint="lower optim.lr, or check the data")
        eval_metrics = loop.eval_and_save(step, t, eval_batches, run_eval, writer, save)
        last = {**last, **(eval_metrics or {})}
        if stopper.update(step, eval_metrics) or loop.stop_requested(preempt, step):
          break

    # ---- final save
    save(step)
    ckpt.wait()
  return loop.finish(preempt, step, workdir, last)


def main(argv):
  del argv
  if FLAGS.workdir is None or FLAGS.config is None:
    raise app.UsageError("--config and --workdir are required")
  t0 = time.time()
  out = run(FLAGS.config, FLAGS.workdir)
  logging.info("done in %.1fs: %s", time.time() - t0, out)


if __name__ == "__main__":
  cli.run(main, define_flags)
