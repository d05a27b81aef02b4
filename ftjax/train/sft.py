"""Supervised fine-tuning: the pure loss and step (the loop lives in experiments/sft.py)."""

from __future__ import annotations

import functools

import jax

from ftjax import losses
from ftjax.train import common


def sft_loss_fn(params: dict, batch: dict, rng: jax.Array, *, model) -> tuple:
  """Masked next-token loss of one (micro-)batch.

  batch: inputs, targets int32 [B, T]; weights float32 [B, T]; optional segment_ids and
  positions int32 [B, T] (packed rows). Returns (loss_sum, n_targets, aux).
  """
  seg = batch.get("segment_ids")
  mask = None if seg is None else seg > 0
  if model.spec.prefix_of("prompt") is not None:
    seg = None  # one example per row (packing is refused with prompt tuning): the mask suffices
  logits = model.apply({"params": params}, batch["inputs"], positions=batch.get("positions"),
                       mask=mask, segment_ids=seg,
                       rngs=None if rng is None else {"dropout": rng})
  loss_sum, n = losses.sft_loss(logits, batch["targets"], batch["weights"])
  return loss_sum, n, {}


def make_step(model, tx, schedule, grad_accum: int = 1, axis_name=None):
  """step(state, frozen, batch) -> (state, metrics); jitted (or pmapped with `axis_name`) by
  the caller, with donation."""
  return functools.partial(common.update_step,
                           loss_fn=functools.partial(sft_loss_fn, model=model), tx=tx,
                           schedule=schedule, grad_accum=grad_accum, axis_name=axis_name)


def eval_step(params: dict, batch: dict, *, model) -> dict:
  """Summed loss and target count of one eval batch (params: trainable merged over frozen)."""
  loss_sum, n, _ = sft_loss_fn(params, batch, None, model=model)  # no dropout
  return {"loss_sum": loss_sum, "target_tokens": n}
