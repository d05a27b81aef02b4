"""The one training-loop skeleton: setup -> restore -> loop (step, log, eval, save) -> final
save -> finish, as small functions that each trainer (ftjax/train/{sft,reward,dpo,grpo,ppo}.py)
calls in its own `run`, so that every loop still reads top to bottom in its own file and shows
only what its algorithm does differently:

  common.validate(config)                    # config checked before anything is built
  drift = wd.check_resume(config, workdir)   # a changed config is refused before any work
  par = setup.parallel(config)
  model, params, tok, base_ref = setup.build_model(config, par=par)
  state, frozen, schedule, tx, summary = loop.init(config, par, params, setup.rules(config))
  build_data = loop.data_builder(data_lib.build_dataset, config, tok, workdir)
  ckpt, state, data, start = loop.restore(workdir, t, state, base_ref, build_data,
                                          begin=lambda: wd.start_run(config, workdir, drift))
  step_fn = par.compile(...)                 # the algorithm's step
  state, frozen = par.state(state), par.frozen(frozen)
  writer, bar = loop.open_logs(workdir, t.steps, start)
  with loop.closing(ckpt, bar, writer):
    with checkpoint.PreemptionHandler() as preempt:
      while step < t.steps:
        ...                                   # the algorithm's batch and step
        if loop.due(step, t.log_every, t.steps):
          last = loop.log(step, host_metrics, writer, bar, hint="lower optim.lr")
        eval_metrics = loop.eval_and_save(step, t, eval_batches, run_eval, writer, save)
        if loop.stop_requested(preempt, step):
          break
    save(step)                                # final save
    ckpt.wait()
  return loop.finish(preempt, step, workdir, last)
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
import optax
from absl import logging

from ftjax import checkpoint, metrics as metrics_lib, offload, partition, provenance, sharding
from ftjax import workdir as wd
from ftjax.errors import Diverged, Interrupted
from ftjax.train import common, setup


def state_shardings(tx, state_shapes: dict, param_shardings: dict, mesh) -> dict:
  """Shardings of a train state on `mesh`: the params' own, each optimizer moment its param's
  (optax's param-shaped leaves), the rest (counts, step, rng) replicated."""
  rep = sharding.replicated(mesh)
  opt = optax.tree_map_params(tx, lambda _, sh: sh, state_shapes["opt_state"], param_shardings,
                              transform_non_params=lambda _: rep)
  return {"step": rep, "params": param_shardings, "opt_state": opt, "rng": rep}


def init_state(par, trainable: dict, tx, seed: int, offload_mode: str = "none") -> dict:
  """The train state, built by a jit under the run's mesh in the params' shards. The moments
  need explicit out_shardings: zeros_like depends on no input, so jit would replicate them on
  every device (the whole optimizer state per device under fsdp). With `offload_mode`
  optimizer (or both) the optimizer state is placed in pinned host memory; the step's
  shardings, taken from the state, keep it there."""
  fn = lambda tr: common.init_state(tr, tx, int(seed))
  with par.context():
    if par.mesh is None:
      return jax.jit(fn)(trainable)
    shapes = jax.eval_shape(fn, trainable)
    out = state_shardings(tx, shapes, jax.tree_util.tree_map(lambda x: x.sharding, trainable),
                          par.mesh)
    if offload.optimizer(offload_mode):  # the init writes it to the host itself
      out["opt_state"] = offload.on_host(out["opt_state"])
    return jax.jit(fn, out_shardings=out)(trainable)


class Init(NamedTuple):
  state: dict  # the train state: trainable params, optimizer state, step, rng
  frozen: dict  # the params that do not train
  schedule: Any
  tx: Any
  summary: dict  # trainable and total parameter counts and bytes (partition.summary)


def init(config, par, params: dict, rules, steps: Optional[int] = None) -> Init:
  """The train state of a run about to train `params`: split by the ordered path-regex `rules`
  into the trainable leaves (in the state, with the optimizer's state) and the frozen rest.
  The optimizer's schedule spans `steps` updates (`train.steps`); the parameter summary is
  logged."""
  trainable, frozen, labels = common.split_params(params, rules)
  schedule, tx = setup.optimizer(config, steps)
  state = init_state(par, trainable, tx, config.train.seed,
                     setup._get(config.train, "offload", "none"))
  summary = partition.summary(params, labels, state["opt_state"])
  logging.info("%s", partition.format_summary(summary))
  return Init(state, frozen, schedule, tx, summary)


def data_builder(build: Callable, config, tok,
                 workdir: Optional[str] = None) -> Callable[[Optional[dict]], Any]:
  """`data_state -> dataset` at that position (None: from the start), for `build` one of the
  dataset builders (`data.build_dataset`, `data.preference.build_preference_dataset`). Each
  host reads its own rows of every global batch. Tokenized examples are cached in
  `data.cache_dir`, or with that empty in `workdir`/data_cache ("none": no cache)."""
  t = config.train

  def build_data(state):
    return build(setup.data_config(config, workdir), tok, int(t.seq_len), int(t.batch_size),
                 seed=int(t.seed), state=state, process_index=jax.process_index(),
                 process_count=jax.process_count())
  return build_data


def restore(workdir: str, t, state: dict, base_ref: dict, build_data: Callable,
            best_metric: str = "eval_loss", begin: Optional[Callable[[], Any]] = None):
  """(checkpointer, state, data, start step): the newest checkpoint of `workdir` that reads,
  or a fresh start.

  Everything a run can refuse is read and checked before `begin()` (the trainer's
  `wd.start_run`, which writes config.json and run.json) is called: a fresh run's data (so a
  bad file leaves no workdir), or on a resume the checkpoint, the base fingerprint (a changed
  base stops the resume) and the data at the restored position, read once there. A damaged
  newer step is skipped with one warning line and, once the run has begun, renamed to
  `<step>.damaged-<time>` so that the resumed run saves that step again. `build_data(state)`
  reads the data at a position (None: the start). The checkpointer is closed if anything fails
  here: an async one left open prints an orbax thread traceback at exit.
  """
  begin = begin or (lambda: None)
  resume = wd.has_checkpoints(workdir)
  data = None
  if not resume:  # checkpoints/ is made only once the run has begun
    data = build_data(None)
    begin()
    provenance.record_data_stats(workdir, data)
  ckpt = checkpoint.Checkpointer(workdir, keep=int(t.keep), async_save=bool(t.async_save),
                                 best_metric=best_metric)
  try:
    start = 0
    if resume:
      step, state, data_state, extra, skipped = ckpt.restore_readable(target=state)
      if base_ref.get("kind") == "hf":
        checkpoint.check_base(extra, base_ref["path"])
      data = build_data(data_state)
      begin()
      provenance.record_data_stats(workdir, data)
      if skipped:
        moved = ckpt.set_aside([s for s, _ in skipped])
        why = "; ".join(f"step {s} ({r}) moved to {os.path.basename(m)}"
                        for (s, r), m in zip(skipped, moved))
        logging.warning("checkpoint unreadable, resuming from step %d instead: %s (in %s)",
                        step, why, ckpt.directory)
      start = int(state["step"])
      logging.info("resumed from step %d of %s", start, workdir)
  except BaseException:
    ckpt.close()
    raise
  return ckpt, state, data, start


def eval_batches(data, t) -> list:
  """The held-out batches, cut to `train.eval_batches` when that is set."""
  batches = data.eval_batches()
  return batches[:int(t.eval_batches)] if t.eval_batches else batches


def jit_eval(par, fn: Callable, frozen: dict) -> Callable:
  """`fn(trainable, frozen, batch)` jitted over the host (unreplicated) frozen params, as
  `eval_fn(trainable, batch)` run under the mesh."""
  jitted = jax.jit(fn)

  def eval_fn(trainable, batch):
    with par.context():
      return jitted(trainable, frozen, batch)
  return eval_fn


def evaluate(eval_fn: Callable, trainable: dict, batches, rates: tuple = ()) -> dict:
  """Means over the eval set of a loss_fn's `(loss_sum, count, aux sums)`, as `eval_<name>`.
  Each of `rates` (an aux that sums 0/1 outcomes per counted example) also gets its counts,
  `eval_<name>_k` of `eval_<name>_n`, for its interval (the model card's Wilson interval)."""
  sums, n = {}, 0.0
  for batch in batches:
    loss_sum, count, aux = jax.device_get(eval_fn(trainable, batch))
    n += float(count)
    for k, v in {"loss": loss_sum, **aux}.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  out = {f"eval_{k}": v / max(n, 1.0) for k, v in sums.items()}
  for k in rates:
    if k in sums and n:
      out[f"eval_{k}_k"], out[f"eval_{k}_n"] = int(round(sums[k])), int(round(n))
  return out


def open_logs(workdir: str, steps: int, start: int):
  """(metrics writer, progress bar) picking up at `start` (a resume drops the later rows)."""
  return (metrics_lib.MetricsWriter(workdir, resume_step=start),
          metrics_lib.ProgressBar(int(steps), initial=start))


def due(step: int, every: int, steps: int) -> bool:
  """Every `every` steps, and at the last step."""
  return step % every == 0 or step == steps


def log(step: int, m: dict, writer, bar, hint: str) -> dict:
  """Writes host metrics (floats); a non-finite loss stops the run before it saves anything
  more (`hint` says what to change)."""
  if not np.isfinite(m["loss"]):
    raise Diverged(f"loss is {m['loss']} at step {step}; stopping without saving ({hint})")
  writer.write(step, m)
  bar.update(step, m)
  return m


def eval_and_save(step: int, t, eval_batches: list, run_eval: Callable[[], dict], writer,
                  save: Callable) -> Optional[dict]:
  """At the eval cadence (when there are eval batches) `run_eval()` and log; a checkpoint at
  the save cadence and after every eval (which ranks it for keep-best). Returns the eval
  metrics, or None when there was no eval this step."""
  eval_metrics = None
  if eval_batches and due(step, t.eval_every, t.steps):
    eval_metrics = run_eval()
    writer.write(step, eval_metrics)
    logging.info("step %d: %s", step, eval_metrics)
  if step % t.save_every == 0 or eval_metrics is not None:
    save(step, eval_metrics)
  return eval_metrics


class EarlyStop:
  """Stops after `patience` evals without a lower eval loss (patience 0: never)."""

  def __init__(self, patience: int):
    self.patience, self.best, self.bad_evals = int(patience or 0), math.inf, 0

  def update(self, step: int, eval_metrics: Optional[dict]) -> bool:
    if eval_metrics is not None:
      if eval_metrics["eval_loss"] < self.best - 1e-6:
        self.best, self.bad_evals = eval_metrics["eval_loss"], 0
      else:
        self.bad_evals += 1
    if self.patience and self.bad_evals >= self.patience:
      logging.info("early stop at step %d: eval loss has not improved for %d evals", step,
                   self.bad_evals)
      return True
    return False


def stop_requested(preempt: checkpoint.PreemptionHandler, step: int) -> bool:
  """Whether any process got SIGTERM/SIGINT: a collective, so every host stops after `step`."""
  if preempt.any_requested():
    logging.warning("signal %s: saving step %d and exiting", preempt.signum, step)
    return True
  return False


@contextlib.contextmanager
def closing(ckpt, bar, writer):
  """Closes all three on any exit; the checkpointer first waits for its saves, so none is left
  half-written."""
  try:
    yield
  finally:
    ckpt.close()
    bar.close()
    writer.close()


def finish(preempt: checkpoint.PreemptionHandler, step: int, workdir: str, last: dict) -> dict:
  """The last logged metrics with the step reached, or `Interrupted` (saved, resumable)."""
  if preempt.requested:
    raise Interrupted(preempt.signum, step, workdir)
  return {**last, "step": step}
