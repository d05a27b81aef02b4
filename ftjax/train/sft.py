"""Supervised fine-tuning: the pure loss and step (the loop lives in experiments/sft.py)."""

from __future__ import annotations

import functools

import jax

from ftjax import heads, losses
from ftjax.train import common


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
