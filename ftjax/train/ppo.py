"""PPO for language models (RLHF, Ziegler et al. 2019; TRL's PPOTrainer): pure functions from a
rollout batch to advantages, the jitted `ppo_epochs` x `num_mini_batches` update, and the loop,
`run(config, workdir)`, which `experiments/ppo.py` runs.

Each iteration: sample one completion per prompt from the params being trained (no copy), score
prompt + completion with the reward model, per-token rewards (-kl_coef * KL to the reference,
plus the score on the last token), GAE advantages, then `num_ppo_epochs` x `num_mini_batches`
clipped policy + value updates in one jitted step. The reference is the SFT model
(`train/reference.py`): the same params with the adapters off, or a frozen copy for full
fine-tuning. Logged under TRL's names (objective/kl, objective/scores, objective/rlhf_reward,
policy/clipfrac_avg, loss/value_avg, ...); held-out: greedy replies' mean score (and the
checks of `config.task`, e.g. the support demo's). Rerunning resumes exactly (rollout keys and the
prompt position are part of the checkpoint).

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

import contextlib
import functools
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import checkpoint, heads, losses, partition, rollout, sharding, tasks
from ftjax import workdir as wd
from ftjax.data import prompts as prompt_data
from ftjax.errors import UserError
from ftjax.train import common, loop, reference, setup
from ftjax.train.setup import CRITIC_KEY, CRITICS, HEAD_KEYS, Critic, add_critic  # noqa: F401

SHUFFLE_STREAM = 0x707071  # keeps the minibatch shuffles apart from the dropout keys
ROLLOUT_STREAM = 0x726F6C  # rollout keys: (seed, stream, iteration), apart from the step's
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


# ---- the loop and its config


def check(config):
  """One-line errors for bad ppo settings, before anything is built."""
  t, pc = config.train, config.ppo
  if pc.critic not in CRITICS:
    raise UserError(f"config.ppo.critic={pc.critic!r}: expected shared or separate")
  if pc.kl_estimator not in losses.KL_ESTIMATORS:
    raise UserError(f"config.ppo.kl_estimator={pc.kl_estimator!r}: expected k1 or k3")
  if not pc.temperature > 0:
    raise UserError(f"config.ppo.temperature={pc.temperature}: PPO samples, it must be > 0")
  for key in ("num_ppo_epochs", "num_mini_batches", "response_length"):
    if int(pc[key]) < 1:
      raise UserError(f"config.ppo.{key}={pc[key]}: must be >= 1")
  if int(config.data.max_prompt_len) < 1:
    raise UserError(f"config.data.max_prompt_len={config.data.max_prompt_len}: must be >= 1")
  mini = int(t.batch_size) // int(pc.num_mini_batches)
  if int(t.batch_size) % int(pc.num_mini_batches) or mini % int(t.grad_accum):
    raise UserError(f"config.train.batch_size={t.batch_size} must split into "
                    f"config.ppo.num_mini_batches={pc.num_mini_batches} minibatches of "
                    f"config.train.grad_accum={t.grad_accum} micro-batches")
  if pc.target <= 0 or pc.horizon <= 0:
    raise UserError("config.ppo.target and config.ppo.horizon must be > 0")


@wd.exclusive  # one run per workdir; a file or read-only disk is refused first
def run(config, workdir: str) -> dict:
  """Train; returns the last logged metrics (and eval metrics) as floats."""
  # ---- setup: config, models and data are checked before anything is written
  common.validate(config)
  check(config)
  t, pc = config.train, config.ppo
  par = setup.parallel(config)
  par.check_batch(int(t.batch_size) // int(pc.num_mini_batches),
                  "config.train.batch_size / config.ppo.num_mini_batches")
  task = tasks.of(config)
  train_rows, eval_rows = tasks.prompt_rows(config)
  drift = wd.check_resume(config, workdir)  # a resume with a changed config is refused
  model, params, tok, base_ref = setup.build_model(config, par=par)
  rm_model, rm_params = wd.load_reward_model(pc.reward_model, model)

  def place(m, p):  # new params straight into their shards under pjit
    if par.mode != "pjit":
      return p
    if m is None:  # the value head: replicated
      return jax.device_put(p, sharding.replicated(par.mesh))
    return sharding.shard_params(m, p, par.mesh, par.rules)
  rm_params = place(rm_model, rm_params)
  params, extra_rules, critic = add_critic(config, model, params, (rm_model, rm_params), place)
  rules = extra_rules + setup.rules(config)
  ref = reference.policy(model, config, params, rules, skip=HEAD_KEYS)
  # The schedule counts optimizer updates: each iteration makes epochs x minibatches of them.
  updates_per_iter = int(pc.num_ppo_epochs) * int(pc.num_mini_batches)
  state, frozen, schedule, tx, _ = loop.init(config, par, params, rules,
                                             steps=int(t.steps) * updates_per_iter)
  frozen = {**frozen, **ref.frozen}
  del params

  eos, pad = rollout.eos_ids(tok, model), rollout.pad_id(tok)
  max_prompt_len = int(config.data.max_prompt_len)

  def build_data(data_state):
    data_state = data_state or {}
    it = prompt_data.PromptIterator(train_rows, int(t.batch_size), int(t.seed),
                                    data_state.get("prompts"))
    it.kl_coef = float(data_state.get("kl_coef", pc.kl_coef))  # the controller's value
    return it

  # ---- restore
  ckpt, state, data, start = loop.restore(workdir, t, state, base_ref, build_data,
                                          begin=lambda: wd.start_run(config, workdir, drift))
  start //= updates_per_iter  # the state counts optimizer steps; the loop counts iterations
  kl_coef = data.kl_coef
  sample = dict(n_samples=1, max_new_tokens=int(pc.response_length), eos_ids=eos, pad_id=pad,
                prompt_len=max_prompt_len)
  exp_fn = jax.jit(functools.partial(
      experience, model=model, ref_model=ref.model, ref_params_fn=ref.params_fn,
      critic=critic, temperature=float(pc.temperature), kl_estimator=pc.kl_estimator,
      gamma=float(pc.gamma), lam=float(pc.lam), whiten_rewards=bool(pc.whiten_rewards),
      missing_eos_penalty=float(pc.missing_eos_penalty) or None, chunk=int(t.logprob_chunk)))
  score_fn = jax.jit(functools.partial(reward_model_scores, rm_model))
  step_fn = par.compile(lambda axis: make_ppo_step(
      model, critic, tx, schedule, cliprange=float(pc.cliprange),
      cliprange_value=float(pc.cliprange_value), vf_coef=float(pc.vf_coef),
      temperature=float(pc.temperature), ppo_epochs=int(pc.num_ppo_epochs),
      num_mini_batches=int(pc.num_mini_batches), grad_accum=int(t.grad_accum),
      chunk=int(t.logprob_chunk), axis_name=axis), state, frozen, schedule)
  frozen_host = frozen  # the rollout and `experience` run unreplicated, even under pmap
  state, frozen = par.state(state), par.frozen(frozen)
  writer, bar = loop.open_logs(workdir, t.steps, start)
  last = {}

  def policy_params():
    return partition.merge(par.host_state(state)["params"], frozen_host)

  def prompt_ids(rows):
    return [prompt_data.encode(tok, r["prompt"], max_prompt_len) for r in rows]

  def save(step, eval_metrics=None):
    ckpt.save(step, par.host_state(state), {"prompts": data.state, "kl_coef": kl_coef},
              eval_metrics, {"base": base_ref})

  def run_eval():
    """Greedy replies to the held-out prompts: their mean reward-model score (eval_loss is its
    negative, for keep-best) and, when the task scores replies, its checks."""
    scores, checks = [], []
    n = int(t.batch_size)
    for i in range(0, len(eval_rows), n):
      rows = eval_rows[i:i + n]
      keep = len(rows)
      rows = rows + [rows[-1]] * (n - keep)  # one shape: no recompile
      with par.context():
        b = rollout.rollout(model, policy_params(), prompt_ids(rows), rng=jax.random.PRNGKey(0),
                            temperature=0.0, **sample)
        scores.extend(np.asarray(score_fn(rm_params, b))[:keep].tolist())
      if hasattr(task, "score_reply"):
        for r, reply in zip(rows[:keep], rollout.decode(tok, b)):
          checks.append(task.score_reply(reply, r))
    out = {"eval_scores": float(np.mean(scores)), "eval_loss": -float(np.mean(scores))}
    if checks:
      out.update({f"eval_{config.task}/{k}": v for k, v in task.summarize(checks).items()})
    return out

  # ---- loop
  with loop.closing(ckpt, bar, writer):
    with checkpoint.PreemptionHandler() as preempt:
      step = start
      while step < t.steps:
        # rollout -> score -> rewards and advantages -> updates
        ids = prompt_ids(data.next())
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(int(t.seed)),
                                                    ROLLOUT_STREAM), step)
        t0 = time.perf_counter()
        with par.context():
          params_now = policy_params()
          batch = rollout.rollout(model, params_now, ids, rng=key,
                                  temperature=float(pc.temperature), **sample)
          t1 = time.perf_counter()
          scores = jax.block_until_ready(score_fn(rm_params, batch))
          t2 = time.perf_counter()
          batch, m_exp = jax.block_until_ready(exp_fn(params_now, batch, scores,
                                                      jnp.float32(kl_coef)))
        del params_now
        batch = {k: batch[k] for k in UPDATE_KEYS}
        if par.mode == "pmap":  # split on the host: pmap takes each device's rows from there
          batch = jax.device_get(batch)
        batch = par.batch(batch)
        t3 = time.perf_counter()
        # The update moves nothing between host and device: state, frozen params and the placed
        # batch are on device already (under pmap the batch is a host array pmap places).
        with (jax.transfer_guard("disallow") if par.mode == "pjit" else contextlib.nullcontext()):
          state, m = step_fn(state, frozen, batch)
        jax.block_until_ready(m)
        # Phases of the step, host seconds: sampling, the reward model's scores, the experience
        # (reference forward, values, KL-shaped rewards, GAE advantages) with the batch placed,
        # the PPO epochs' updates.
        phases = {"rollout_seconds": t1 - t0, "score_seconds": t2 - t1,
                  "experience_seconds": t3 - t2, "update_seconds": time.perf_counter() - t3}
        step += 1
        m_exp = {k: float(v) for k, v in jax.device_get(m_exp).items()}
        coef_used = kl_coef
        if pc.adap_kl_ctrl:  # TRL updates it after every batch, with n_steps = batch size
          kl_coef = float(losses.adaptive_kl_update(kl_coef, m_exp["objective/kl"],
                                                    int(t.batch_size), float(pc.target),
                                                    float(pc.horizon)))
        if loop.due(step, t.log_every, t.steps):
          m = {**{k: float(v) for k, v in jax.device_get(par.metrics(m)).items()}, **m_exp,
               "objective/kl_coef": coef_used, "episode": step * int(t.batch_size),
               # the progress bar's two numbers
               "reward": m_exp["objective/scores"], "kl": m_exp["objective/kl"], **phases}
          last = loop.log(step, m, writer, bar, hint="lower optim.lr or raise ppo.kl_coef")
        eval_metrics = loop.eval_and_save(step, t, eval_rows, run_eval, writer, save)
        last = {**last, **(eval_metrics or {})}
        if loop.stop_requested(preempt, step):
          break
    # ---- final save
    save(step)
    ckpt.wait()
  return loop.finish(preempt, step, workdir, last)

