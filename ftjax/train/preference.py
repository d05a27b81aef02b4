"""Reward modelling and DPO: pure losses over preference batches (loops in experiments/).

A preference batch holds B pairs as 2B rows: rows [0, B) are the chosen responses, rows
[B, 2B) the matching rejected ones (see `ftjax.data.preference`), so both sides go through
one forward pass. `inputs`, `targets`, `weights`, `segment_ids`, `positions`: [2B, T].
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from ftjax import heads, losses
from ftjax.train import common


def _hidden(model, params, batch, rng=None):
  """Final hidden states [2B, T, D] of the input rows."""
  seg = batch["segment_ids"]
  return model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                     mask=seg > 0, return_hidden=True,
                     rngs=None if rng is None else {"dropout": rng})


def full_sequences(batch: dict) -> tuple[jax.Array, jax.Array]:
  """The whole token rows [2B, T+1] and their mask, EOS included (inputs drop the last token)."""
  n = (batch["segment_ids"] > 0).sum(-1)  # [2B] input length = sequence length - 1
  rows = jnp.arange(batch["inputs"].shape[0])
  last = jnp.take_along_axis(batch["targets"], jnp.maximum(n - 1, 0)[:, None], -1)[:, 0]
  tokens = jnp.concatenate([batch["inputs"], jnp.zeros_like(batch["inputs"][:, :1])], axis=1)
  tokens = tokens.at[rows, n].set(last)
  mask = jnp.arange(tokens.shape[1])[None, :] <= n[:, None]
  return tokens, mask


def rewards_of(model, params, batch: dict, rng=None) -> jax.Array:
  """Scalar reward per row [2B], read where HF's classifiers read it (`heads.sequence_score`)."""
  tokens, mask = full_sequences(batch)
  hidden = model.apply({"params": params}, tokens, mask=mask, return_hidden=True,
                       rngs=None if rng is None else {"dropout": rng})  # [2B, T+1, D]
  return heads.sequence_score(params, hidden, tokens, mask, model.cfg)


def reward_loss_fn(params, batch, rng, *, model, margin: Optional[float] = None,
                   center_coef: float = 0.0):
  """Bradley-Terry: -log σ(r_chosen - r_rejected - margin); returns (sum, pairs, aux sums)."""
  r = rewards_of(model, params, batch, rng)
  b = r.shape[0] // 2
  rc, rr = r[:b], r[b:]
  valid = (batch["weights"][:b].sum(-1) > 0).astype(jnp.float32)  # padding pairs count zero
  per_pair = losses.bradley_terry_losses(rc, rr, margin, center_coef)
  aux = losses.bradley_terry_metric_sums(rc, rr, valid)
  return (per_pair * valid).sum(), valid.sum(), aux


def side_logps(model, params, batch, rng=None, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Summed and mean response logprobs per row: ([2B], [2B]); `chunk` as `token_logprobs`."""
  hidden = _hidden(model, params, batch, rng)
  head = lambda h: heads.lm_logits(params, h, model.cfg)
  tok = losses.token_logprobs(hidden, head, batch["targets"], batch["weights"] != 0, chunk)
  return losses.sequence_logps_sum_and_mean(tok, batch["weights"])


def dpo_loss_fn(params, batch, rng, *, model, ref_model, ref_params_fn, beta: float,
                loss_type: str, label_smoothing: float, chunk: int = 0):
  """DPO family over one batch; returns (sum of pair losses, pairs, aux sums).

  The reference log-probabilities come from `batch["ref_logps"]` ([2B], precomputed) when
  present, else from `ref_model` on `ref_params_fn(params)`: the same params with the
  adapters switched off (no second copy of the model), or a frozen initial copy.
  """
  sums, means = side_logps(model, params, batch, rng, chunk)
  if "ref_logps" in batch:
    ref_sums, ref_means = batch["ref_logps"], batch["ref_logps_mean"]
  else:
    ref_sums, ref_means = side_logps(ref_model, jax.lax.stop_gradient(ref_params_fn(params)),
                                     batch, chunk=chunk)
    ref_sums, ref_means = jax.lax.stop_gradient(ref_sums), jax.lax.stop_gradient(ref_means)
  pol, ref = (means, ref_means) if loss_type == "ipo" else (sums, ref_sums)
  b = pol.shape[0] // 2
  per_pair, rc, rr = losses.dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], beta=beta,
                                     loss_type=loss_type, label_smoothing=label_smoothing)
  valid = (batch["weights"][:b].sum(-1) > 0).astype(jnp.float32)
  n_chosen = jnp.maximum(batch["weights"][:b].sum(-1), 1.0)
  aux = {**losses.dpo_metric_sums(rc, rr, sums[:b], sums[b:], valid),
         # Per-token KL(policy || reference) estimated on the chosen responses.
         "kl/chosen": jax.lax.stop_gradient(((sums[:b] - ref_sums[:b]) / n_chosen) * valid).sum()}
  return (per_pair * valid).sum(), valid.sum(), aux


def make_reward_step(model, tx, schedule, grad_accum=1, margin=None, center_coef=0.0,
                     axis_name=None):
  loss_fn = functools.partial(reward_loss_fn, model=model, margin=margin,
                              center_coef=center_coef)
  return functools.partial(common.update_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                           grad_accum=grad_accum, axis_name=axis_name)


def make_dpo_step(model, ref_model, ref_params_fn, tx, schedule, *, beta, loss_type,
                  label_smoothing=0.0, grad_accum=1, axis_name=None, chunk=0):
  loss_fn = functools.partial(dpo_loss_fn, model=model, ref_model=ref_model,
                              ref_params_fn=ref_params_fn, beta=beta, loss_type=loss_type,
                              label_smoothing=label_smoothing, chunk=chunk)
  return functools.partial(common.update_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                           grad_accum=grad_accum, axis_name=axis_name)


def per_pair_means(metrics: dict) -> dict:
  """Aux sums of `update_step` divided by the number of pairs (its `target_tokens`)."""
  n = max(float(metrics["target_tokens"]), 1.0)
  return {k: (float(v) / n if ("/" in k or k in ("accuracy", "reward_chosen", "reward_rejected",
                                                  "margin")) else float(v))
          for k, v in metrics.items()}

