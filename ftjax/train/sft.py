"""Supervised fine-tuning and continued pretraining: the loss, the step and the loop.

`run(config, workdir)` is what `experiments/sft.py` runs. Rerunning it on the same workdir
resumes from the latest checkpoint, exactly. SIGTERM (preemption) or SIGINT (Ctrl-C) saves a
checkpoint and raises `Interrupted`; config, model and data are checked before anything is
written to the workdir.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from absl import logging

from ftjax import checkpoint, data as data_lib, heads, losses, metrics as metrics_lib, partition
from ftjax import workdir as wd
from ftjax.errors import UserError
from ftjax.train import common, loop, setup


def sft_loss_fn(params: dict, batch: dict, rng: jax.Array, *, model, chunk: int = 0) -> tuple:
  """Masked next-token loss of one (micro-)batch.

  batch: inputs, targets int32 [B, T]; weights float32 [B, T]; optional segment_ids and
  positions int32 [B, T] (packed rows). `chunk`: positions of T per LM-head chunk
  (`losses.token_logprobs`; 0 = all at once). Returns (loss_sum, n_targets, aux).
  """
  seg = batch.get("segment_ids")
  mask = None if seg is None else seg > 0
  if model.spec.prefix_of("prompt") is not None:
    seg = None  # one example per row (packing is refused with prompt tuning): the mask suffices
  hidden = model.apply({"params": params}, batch["inputs"], positions=batch.get("positions"),
                       mask=mask, segment_ids=seg, return_hidden=True,
                       rngs=None if rng is None else {"dropout": rng})  # [B, T, D]
  head = lambda h: heads.lm_logits(params, h, model.cfg)
  weights = batch["weights"]
  logps = losses.token_logprobs(hidden, head, batch["targets"], weights != 0, chunk=chunk)
  loss_sum, n = losses.sft_loss(logps, weights)
  return loss_sum, n, {}


def make_step(model, tx, schedule, grad_accum: int = 1, axis_name=None, chunk: int = 0):
  """step(state, frozen, batch) -> (state, metrics); jitted (or pmapped with `axis_name`) by
  the caller, with donation."""
  return functools.partial(common.update_step,
                           loss_fn=functools.partial(sft_loss_fn, model=model, chunk=chunk), tx=tx,
                           schedule=schedule, grad_accum=grad_accum, axis_name=axis_name)


def eval_step(params: dict, batch: dict, *, model, chunk: int = 0) -> dict:
  """Summed loss and target count of one eval batch (params: trainable merged over frozen)."""
  loss_sum, n, _ = sft_loss_fn(params, batch, None, model=model, chunk=chunk)  # no dropout
  return {"loss_sum": loss_sum, "target_tokens": n}


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
  logging.info("model %s (%s), adapter %s, quant %s", model.cfg.family,
               config.model.hf_path or config.model.preset, config.adapter.kind,
               config.quant.kind)
  state, frozen, schedule, tx, summary = loop.init(config, par, params, setup.rules(config))
  del params
  build_data = loop.data_builder(data_lib.build_dataset, config, tok, workdir)

  # ---- restore (a fresh run reads its data first, so a bad file leaves no workdir)
  ckpt, state, data, start = loop.restore(workdir, t, state, base_ref, build_data,
                                          begin=lambda: wd.start_run(config, workdir, drift))
  logging.info("train data: %s", data.stats)
  eval_batches = loop.eval_batches(data, t)

  chunk = int(t.logprob_chunk)
  step_fn = par.compile(lambda axis: make_step(model, tx, schedule, int(t.grad_accum), axis,
                                               chunk), state, frozen, schedule)
  eval_fn = loop.jit_eval(par, lambda trainable, frz, batch: eval_step(
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
