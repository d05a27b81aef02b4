"""What the reward-model and DPO trainers (train/reward.py, train/dpo.py) share: the layout of a
preference batch and the bookkeeping of its pairs.

A preference batch holds B pairs as 2B rows: rows [0, B) are the chosen responses, rows
[B, 2B) the matching rejected ones (see `ftjax.data.preference`), so both sides go through
one forward pass. `inputs`, `targets`, `weights`, `segment_ids`, `positions`: [2B, T].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def valid_pairs(batch: dict) -> jax.Array:
  """1.0 for each real pair, 0.0 for a padding pair (no chosen tokens): float32 [B]."""
  b = batch["weights"].shape[0] // 2
  return (batch["weights"][:b].sum(-1) > 0).astype(jnp.float32)


# The keys without a "/" that are sums over pairs too (reward model; ORPO, CPO, KTO).
PER_PAIR_KEYS = ("accuracy", "reward_chosen", "reward_rejected", "margin", "nll_loss",
                 "log_odds_ratio", "log_odds_chosen", "kl")


def per_pair_means(metrics: dict) -> dict:
  """Aux sums of `update_step` divided by the number of pairs (its `target_tokens`)."""
  n = max(float(metrics["target_tokens"]), 1.0)
  return {k: (float(v) / n if ("/" in k or k in PER_PAIR_KEYS) else float(v))
          for k, v in metrics.items()}
