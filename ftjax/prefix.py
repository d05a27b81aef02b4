"""Prefix and prompt tuning: the prefixes a model's params produce.

The modules live in `model.py` (`PrefixEncoder`, the soft prompt in `Decoder`); PEFT's
PREFIX_TUNING / PROMPT_TUNING directories are read and written by `peft_io.py`.
"""

from __future__ import annotations

import jax.numpy as jnp

from ftjax.model import Decoder, PrefixEncoder


def prefix_kv(model: Decoder, params: dict) -> jnp.ndarray:
  """The learned prefixes [L, 2, P, K, H] (through the MLP when reparametrised)."""
  return PrefixEncoder(model.cfg, model.spec.prefix).apply({"params": params["prefix"]})
