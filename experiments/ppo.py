"""PPO (RLHF) from an SFT model against a trained reward model, TRL's PPOTrainer in a loop.

  python experiments/ppo.py --config=configs/ppo.py:data=support --workdir=/tmp/ppo \
      --config.model.hf_path=/path/to/sft_hf --config.ppo.reward_model=/tmp/rm

Each iteration: sample one completion per prompt from the params being trained (no copy), score
prompt + completion with the reward model, per-token rewards (-kl_coef * KL to the reference,
plus the score on the last token), GAE advantages, then `num_ppo_epochs` x `num_mini_batches`
clipped policy + value updates in one jitted step. The reference is the SFT model: the same
params with the adapters off, or a frozen copy for full fine-tuning. Logged under TRL's names
(objective/kl, objective/scores, objective/rlhf_reward, policy/clipfrac_avg, loss/value_avg,
...); held-out: greedy replies' mean score (and the checks of `config.task`, e.g. the support
demo's).
Rerunning resumes exactly (rollout keys and the prompt position are part of the checkpoint).
"""

from __future__ import annotations

import functools
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from ftjax import checkpoint, cli, lora, losses, partition, rollout, sharding, tasks  # noqa: E402
from ftjax import workdir as wd  # noqa: E402
from ftjax.data import prompts as prompt_data  # noqa: E402
from ftjax.errors import UserError  # noqa: E402
from ftjax.train import common, loop, setup  # noqa: E402
from ftjax.train import ppo as ppo_lib  # noqa: E402


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file (configs/ppo.py:arg).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the config, metrics and checkpoints go.")


FLAGS = flags.FLAGS
REF_KEY = "reference"  # frozen copies of the trainable leaves the reference reads
ROLLOUT_STREAM = 0x726F6C  # rollout keys: (seed, stream, iteration), apart from the step's


def reference(model, config, params, rules):
  """(reference model, params -> reference params, frozen copies), as experiments/dpo.py: the
  adapters switched off, with frozen copies of the trained leaves the base model reads."""
  ref_model = lora.disable(model) if config.adapter.kind != "none" else model
  trainable = partition.split(params, partition.label_params(params, rules))[0]
  flat = traverse_util.flatten_dict(trainable)
  if config.adapter.kind != "none":
    adapter = traverse_util.flatten_dict(partition.split(
        params, partition.label_params(params, partition.rules_for(config.adapter.kind)))[0])
    flat = {k: v for k, v in flat.items() if k not in adapter}
  moving = {k: jnp.copy(v) for k, v in flat.items() if k[0] not in ppo_lib.HEAD_KEYS}
  if not moving:
    return ref_model, (lambda p: p), {}

  def ref_params(p):
    out = traverse_util.flatten_dict({k: v for k, v in p.items() if k != REF_KEY})
    out.update(traverse_util.flatten_dict(p[REF_KEY]))
    return traverse_util.unflatten_dict(out)
  return ref_model, ref_params, {REF_KEY: traverse_util.unflatten_dict(moving)}


def check(config):
  """One-line errors for bad ppo settings, before anything is built."""
  t, pc = config.train, config.ppo
  if pc.critic not in ppo_lib.CRITICS:
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
  params, extra_rules, critic = ppo_lib.add_critic(config, model, params, (rm_model, rm_params),
                                                   place)
  rules = extra_rules + setup.rules(config)
  ref_model, ref_params_fn, ref_frozen = reference(model, config, params, rules)
  trainable, frozen, labels = common.split_params(params, rules)
  frozen = {**frozen, **ref_frozen}
  updates_per_iter = int(pc.num_ppo_epochs) * int(pc.num_mini_batches)
  o = config.optim
  schedule = common.make_schedule(o.lr, int(t.steps) * updates_per_iter, int(o.warmup_steps),
                                  o.schedule, float(o.min_lr_ratio))
  tx = common.make_optimizer(o.name, schedule, float(o.weight_decay), float(o.clip), float(o.b1),
                             float(o.b2), float(o.eps))
  state = loop.init_state(par, trainable, tx, t.seed)
  logging.info("%s", partition.format_summary(partition.summary(params, labels,
                                                                state["opt_state"])))
  del params, trainable

  eos, pad = rollout.eos_ids(tok, model), rollout.pad_id(tok)
  max_prompt_len = int(config.data.max_prompt_len)

  def build_data(data_state):
    data_state = data_state or {}
    it = prompt_data.PromptIterator(train_rows, int(t.batch_size), int(t.seed),
                                    data_state.get("prompts"))
    it.kl_coef = float(data_state.get("kl_coef", pc.kl_coef))  # the controller's value
    return it

  # ---- restore
  ckpt, state, data, start = loop.restore(workdir, t, state, base_ref, build_data(None),
                                          build_data,
                                          begin=lambda: wd.start_run(config, workdir, drift))
  start //= updates_per_iter  # the state counts optimizer steps; the loop counts iterations
  kl_coef = data.kl_coef
  sample = dict(n_samples=1, max_new_tokens=int(pc.response_length), eos_ids=eos, pad_id=pad,
                prompt_len=max_prompt_len)
  exp_fn = jax.jit(functools.partial(
      ppo_lib.experience, model=model, ref_model=ref_model, ref_params_fn=ref_params_fn,
      critic=critic, temperature=float(pc.temperature), kl_estimator=pc.kl_estimator,
      gamma=float(pc.gamma), lam=float(pc.lam), whiten_rewards=bool(pc.whiten_rewards),
      missing_eos_penalty=float(pc.missing_eos_penalty) or None, chunk=int(t.logprob_chunk)))
  score_fn = jax.jit(functools.partial(ppo_lib.reward_model_scores, rm_model))
  step_fn = par.compile(lambda axis: ppo_lib.make_ppo_step(
      model, critic, tx, schedule, cliprange=float(pc.cliprange),
      cliprange_value=float(pc.cliprange_value), vf_coef=float(pc.vf_coef),
      temperature=float(pc.temperature), ppo_epochs=int(pc.num_ppo_epochs),
      num_mini_batches=int(pc.num_mini_batches), grad_accum=int(t.grad_accum),
      chunk=int(t.logprob_chunk), axis_name=axis), state, frozen)
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
        with par.context():
          params_now = policy_params()
          batch = rollout.rollout(model, params_now, ids, rng=key,
                                  temperature=float(pc.temperature), **sample)
          scores = score_fn(rm_params, batch)
          batch, m_exp = exp_fn(params_now, batch, scores, jnp.float32(kl_coef))
        del params_now
        batch = {k: batch[k] for k in ppo_lib.UPDATE_KEYS}
        if par.mode == "pmap":  # split on the host: pmap takes each device's rows from there
          batch = jax.device_get(batch)
        state, m = step_fn(state, frozen, par.batch(batch))
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
               "reward": m_exp["objective/scores"], "kl": m_exp["objective/kl"]}
          last = loop.log(step, m, writer, bar, hint="lower optim.lr or raise ppo.kl_coef")
        eval_metrics = loop.eval_and_save(step, t, eval_rows, run_eval, writer, save)
        last = {**last, **(eval_metrics or {})}
        if loop.stop_requested(preempt, step):
          break
    # ---- final save
    save(step)
    ckpt.wait()
  return loop.finish(preempt, step, workdir, last)


def main(argv):
  del argv
  if FLAGS.workdir is None or FLAGS.config is None:
    raise app.UsageError("--config and --workdir are required")
  logging.info("done: %s", run(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
  cli.run(main, define_flags)
