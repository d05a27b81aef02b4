"""The reference policy of DPO, PPO and GRPO: the model a run started from, kept without a
second copy of it where possible.

With adapters the reference is the same params with the adapters switched off
(`lora.disable`), except the base leaves that train beside them (`adapter.train_extra`): those
move with training, so a frozen copy of their initial values stands in for them. Full
fine-tuning keeps a frozen copy of every trained leaf. The copies live beside the frozen params
under `REF_KEY`, so they are placed, sharded and passed to the step like the rest of them:

  ref = reference.policy(model, config, params, rules)
  trainable, frozen, labels = common.split_params(params, rules)
  frozen = {**frozen, **ref.frozen}
  ...
  ref_logps = f(ref.model, ref.params_fn(partition.merge(trainable, frozen)))
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
from flax import traverse_util

from ftjax import lora, partition

REF_KEY = "reference"  # the frozen copies of the trained leaves the reference reads


class Reference(NamedTuple):
  model: Any  # the policy's model, with the adapters switched off when there are any
  params_fn: Callable[[dict], dict]  # the run's full params -> the reference's params
  frozen: dict  # {REF_KEY: copies} to keep beside the frozen params; {} when none are needed


def _no_params(p):
  raise AssertionError("precomputed reference: every batch carries the reference's logps")


def policy(model, config, params: dict, rules, skip: tuple = (),
           precomputed: bool = False) -> Reference:
  """The reference of a run about to train `params` (its initial params) under `rules`.

  `skip`: top-level keys of trained params the reference never reads (PPO's value head and
  critic). `precomputed`: no copy is kept, as the caller computes the reference's outputs once
  from the initial params (DPO's `dpo.reference=precomputed`); `params_fn` then refuses.
  """
  ref_model = lora.disable(model) if config.adapter.kind != "none" else model
  if precomputed:
    return Reference(ref_model, _no_params, {})
  moving = {k: v for k, v in _moving_leaves(config, params, rules).items() if k[0] not in skip}
  if not moving:
    return Reference(ref_model, lambda p: p, {})
  # A real copy: the trainable params share these buffers and the step donates them.
  copy = {REF_KEY: traverse_util.unflatten_dict({k: jnp.copy(v) for k, v in moving.items()})}

  def params_fn(p):
    flat = traverse_util.flatten_dict({k: v for k, v in p.items() if k != REF_KEY})
    flat.update(traverse_util.flatten_dict(p[REF_KEY]))
    return traverse_util.unflatten_dict(flat)
  return Reference(ref_model, params_fn, copy)


def _moving_leaves(config, params: dict, rules) -> dict:
  """Flat {path: leaf} of the trained leaves that the reference model reads: all of them for
  full fine-tuning, those beside the adapters (`adapter.train_extra`) otherwise."""
  trainable = partition.split(params, partition.label_params(params, rules))[0]
  flat = traverse_util.flatten_dict(trainable)
  if config.adapter.kind == "none":
    return flat
  adapter_only = partition.rules_for(config.adapter.kind)
  adapter = traverse_util.flatten_dict(
      partition.split(params, partition.label_params(params, adapter_only))[0])
  return {k: v for k, v in flat.items() if k not in adapter}
