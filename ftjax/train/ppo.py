"""PPO for language models (RLHF, Ziegler et al. 2019; TRL's PPOTrainer): pure functions from a
rollout batch to advantages, and the jitted `ppo_epochs` x `num_mini_batches` update.

A rollout batch (right-padded completions after fixed-length left-padded prompts, so every
iteration has the same shapes and nothing recompiles):
  prompt_tokens int32 [B, P], prompt_mask bool [B, P] (False on the left padding),
  completion_tokens int32 [B, M], completion_mask bool [B, M] (True up to and including EOS),
  terminated bool [B] (the completion ended with an EOS, not the length limit).
`ftjax.rollout.rollout` makes it (n_samples=1, a fixed `prompt_len`); `experience` adds the
behaviour log-probs and values, per-token rewards, GAE advantages and returns; `make_ppo_step`
makes the pure update `(state, frozen, batch) -> (state, metrics)`.

Log-probs come from the one RL logprob function, `rollout.completion_logprobs`: completion
token j is read at position P - 1 + j, where the value of the state before token j is read too
(TRL: `[:, context_length - 1 : -1]`), with the logits divided by the sampling temperature, as
TRL does, so importance ratios are those of the distribution actually sampled. The critic is
`shared` (heads.value on the policy trunk: one forward gives both) or `separate` (a
reward-model-shaped decoder under `params["critic"]`, its score head read as the value,
initialised from the reward model).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from ftjax import heads, losses, rollout
from ftjax.train import common
from ftjax.train.setup import CRITIC_KEY, CRITICS, HEAD_KEYS, Critic, add_critic  # noqa: F401

SHUFFLE_STREAM = 0x707071  # keeps the minibatch shuffles apart from the dropout keys
UPDATE_KEYS = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask",
               "old_logps", "old_values", "advantages", "returns")


def sequences(batch: dict) -> tuple[jax.Array, jax.Array]:
  """Prompt and completion as one row: tokens int32 [B, P + M], mask bool [B, P + M]."""
  tokens = jnp.concatenate([batch["prompt_tokens"], batch["completion_tokens"]], axis=1)
  mask = jnp.concatenate([batch["prompt_mask"], batch["completion_mask"]], axis=1).astype(bool)
  return tokens, mask


def completion_hidden(model, params, batch: dict, rng=None) -> jax.Array:
  """Hidden states [B, M, D] of the positions that predict each completion token (the separate
  critic's; the policy's come with its log-probs from `rollout.completion_logprobs`)."""
  tokens, mask = sequences(batch)
  hidden = model.apply({"params": params}, tokens, mask=mask, return_hidden=True,
                       rngs=None if rng is None else {"dropout": rng})  # [B, P + M, D]
  p, m = batch["prompt_tokens"].shape[1], batch["completion_tokens"].shape[1]
  return hidden[:, p - 1:p + m - 1]


def values_of(critic: Critic, model, params, hidden, batch, rng=None) -> jax.Array:
  """V(state before completion token j) [B, M]: the value head on the policy's `hidden`, or the
  separate critic's score head on its own forward."""
  if critic.kind == "shared":
    v = heads.value(params, hidden, model.cfg)
  else:
    cp = params[CRITIC_KEY]
    v = heads.score(cp, completion_hidden(critic.model, cp, batch, rng), critic.model.cfg)
  return jnp.where(batch["completion_mask"], v, 0.0)


def reward_model_scores(rm_model, rm_params, batch: dict) -> jax.Array:
  """The reward model's score of each prompt + completion [B], read where HF's
  *ForSequenceClassification reads it (`heads.sequence_score`, as the reward model was trained)."""
  tokens, mask = sequences(batch)
  hidden = rm_model.apply({"params": rm_params}, tokens, mask=mask, return_hidden=True)
  return heads.sequence_score(rm_params, hidden, tokens, mask, rm_model.cfg)


def experience(params, batch: dict, scores, kl_coef, *, model, ref_model, ref_params_fn,
               critic: Critic, temperature: float, kl_estimator: str = "k1", gamma: float = 1.0,
               lam: float = 0.95, whiten_rewards: bool = False,
               missing_eos_penalty: Optional[float] = None, chunk: int = 0
               ) -> tuple[dict, dict]:
  """Behaviour log-probs and values, rewards, GAE advantages (whitened) and returns.

  Args:
    params: the full params tree (trainable merged over frozen), as sampled from.
    batch: a rollout batch (module docstring); scores: float [B] from the reward;
    kl_coef: float32 scalar (traced: the adaptive controller changes it without a retrace).
  Returns:
    (the batch with old_logps, old_values, advantages, returns [B, M] added,
     TRL's objective/* metrics over this batch).
  """
  mask = batch["completion_mask"].astype(bool)
  logps, hidden = rollout.completion_logprobs(model, params, batch, temperature=temperature,
                                              chunk=chunk, return_hidden=True)
  ref_logps = rollout.completion_logprobs(ref_model, ref_params_fn(params), batch,
                                          temperature=temperature, chunk=chunk)
  values = values_of(critic, model, params, hidden, batch)
  scores = losses.apply_missing_eos_penalty(scores.astype(jnp.float32), batch["terminated"],
                                            missing_eos_penalty)
  rewards, kl, non_score = losses.ppo_rewards(logps, ref_logps, scores, mask, kl_coef,
                                              kl_estimator)
  if whiten_rewards:
    rewards = jnp.where(mask, losses.masked_whiten(rewards, mask, shift_mean=False), 0.0)
  adv, returns = losses.gae(rewards, values, mask, gamma, lam)
  adv = jnp.where(mask, losses.masked_whiten(adv, mask), 0.0)
  out = {**batch, "old_logps": logps, "old_values": values, "advantages": adv,
         "returns": returns}
  mean_non_score = non_score.sum(1).mean()
  metrics = {"objective/kl": kl.sum(1).mean(),
             "objective/entropy": (-logps).sum(1).mean(),  # TRL's: -log p of the samples
             "objective/non_score_reward": mean_non_score,
             "objective/rlhf_reward": mean_non_score + scores.mean(),
             "objective/scores": scores.mean(),
             "val/num_eos_tokens": batch["terminated"].sum(),
             "completions/mean_length": mask.sum(1).mean()}
  return jax.tree_util.tree_map(jax.lax.stop_gradient, out), metrics


def ppo_loss_fn(params, mb: dict, rng, *, model, critic: Critic, cliprange: float,
                cliprange_value: float, vf_coef: float, temperature: float, chunk: int = 0):
  """Clipped policy + vf_coef * clipped value loss over one minibatch, as sums over its
  completion tokens: (loss sum, token count, aux sums) for `common.update_step`.

  One token count normalises both terms, so loss = masked_mean(pg) + vf_coef *
  masked_mean(vf), TRL's `pg_loss + vf_coef * vf_loss` (their masks are the same here).
  """
  m = mb["completion_mask"].astype(jnp.float32)
  logps, hidden = rollout.completion_logprobs(model, params, mb, temperature=temperature,
                                              chunk=chunk, return_hidden=True, rng=rng)
  vpred = values_of(critic, model, params, hidden, mb, rng)
  pg, pg_clipped, ratio = losses.ppo_policy_losses(logps, mb["old_logps"], mb["advantages"],
                                                   cliprange)
  vf, vf_clipped = losses.ppo_value_losses(vpred, mb["old_values"], mb["returns"],
                                           cliprange_value)
  diff = jax.lax.stop_gradient(logps - mb["old_logps"])
  sg = jax.lax.stop_gradient
  head = lambda h: heads.lm_logits(params, h, model.cfg) / temperature
  aux = {"loss/policy_avg": sg(pg * m).sum(), "loss/value_avg": sg(vf * m).sum(),
         "policy/clipfrac_avg": (pg_clipped * m).sum(), "val/clipfrac_avg": (vf_clipped * m).sum(),
         "policy/approxkl_avg": (0.5 * diff ** 2 * m).sum(), "val/ratio": sg(ratio * m).sum(),
         "policy/entropy_avg": (losses.token_entropy(hidden, head, chunk) * m).sum()}
  return ((pg + vf_coef * vf) * m).sum(), m.sum(), aux


def ppo_update(state: dict, frozen: dict, batch: dict, *, loss_fn: Callable, tx, schedule,
               ppo_epochs: int, num_mini_batches: int, grad_accum: int = 1,
               axis_name: Optional[str] = None) -> tuple[dict, dict]:
  """`ppo_epochs` passes over the rollout batch, each a fresh shuffle cut into
  `num_mini_batches` optimizer steps (`common.update_step`, `grad_accum` micro-batches each).

  Pure and jitted once; the shuffles come from the state's rng folded with its step, so a
  resumed run shuffles as the uninterrupted one. Metrics: per-minibatch token means, averaged
  over all minibatches (TRL's `*_avg`), plus `val/ratio_var` and the last step's norms and lr.
  """
  batch = {k: batch[k] for k in UPDATE_KEYS}
  b = batch["completion_tokens"].shape[0]
  shuffle = jax.random.fold_in(jax.random.fold_in(state["rng"], SHUFFLE_STREAM), state["step"])
  keys = jax.random.split(shuffle, ppo_epochs)

  def epoch(state, key):
    perm = jax.random.permutation(key, b)
    mbs = jax.tree_util.tree_map(
        lambda x: x[perm].reshape((num_mini_batches, b // num_mini_batches) + x.shape[1:]), batch)
    return jax.lax.scan(lambda s, mb: common.update_step(
        s, frozen, mb, loss_fn=loss_fn, tx=tx, schedule=schedule, grad_accum=grad_accum,
        axis_name=axis_name), state, mbs)

  state, m = jax.lax.scan(epoch, state, keys)  # every metric [E, N]
  n = jnp.maximum(m["target_tokens"], 1.0)
  out = {k: (m[k] / n).mean() for k in m if "/" in k}
  out["val/ratio_var"] = (m["val/ratio"] / n).var()
  out.update({k: m[k][-1, -1] for k in ("grad_norm", "update_norm", "param_norm", "lr")})
  out["loss"] = m["loss"].mean()
  return state, out


def make_ppo_step(model, critic: Critic, tx, schedule, *, cliprange, cliprange_value, vf_coef,
                  temperature, ppo_epochs, num_mini_batches, grad_accum=1, chunk=0,
                  axis_name=None):
  loss_fn = functools.partial(ppo_loss_fn, model=model, critic=critic, cliprange=cliprange,
                              cliprange_value=cliprange_value, vf_coef=vf_coef,
                              temperature=temperature, chunk=chunk)
  return functools.partial(ppo_update, loss_fn=loss_fn, tx=tx, schedule=schedule,
                           ppo_epochs=ppo_epochs, num_mini_batches=num_mini_batches,
                           grad_accum=grad_accum, axis_name=axis_name)
