"""GRPO (GSPO, DAPO, Dr. GRPO) from an SFT model, with rewards on sampled completions.

  python experiments/grpo.py --config=configs/grpo.py:task=arithmetic --workdir=/tmp/grpo
  python experiments/grpo.py --config=configs/grpo.py --workdir=/tmp/grpo \
      --config.model.hf_path=/path/to/sft_hf --config.data.path=prompts.jsonl

Each step: G completions per prompt sampled from the params being trained (no copy, same
process), scored by the reward functions, advantages per group, then `grpo.num_iterations`
updates on that batch. The reference model (beta != 0) is the same params with the adapters
off, or a frozen copy of the initial params for full fine-tuning. Rerunning resumes exactly:
the rollout rng is a function of the step, the prompt position is in the checkpoint.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ftjax import checkpoint, cli, lora, losses, partition, rewards, rollout, tasks  # noqa: E402
from ftjax import workdir as wd  # noqa: E402
from ftjax.data import prompts as prompt_data  # noqa: E402
from ftjax.errors import UserError  # noqa: E402
from ftjax.train import common, grpo as grpo_train, loop, setup  # noqa: E402


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file (configs/grpo.py:arg).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the config, metrics and checkpoints go.")


FLAGS = flags.FLAGS


def settings(config) -> grpo_train.GRPOSettings:
  g = config.grpo
  try:
    return grpo_train.GRPOSettings(
        loss_type=g.loss_type, beta=float(g.beta), epsilon=float(g.epsilon),
        epsilon_high=float(g.epsilon_high) if g.epsilon_high else None,
        delta=float(g.delta) if g.delta else None,
        importance_sampling_level=g.importance_sampling_level,
        mask_truncated_completions=bool(g.mask_truncated_completions),
        temperature=float(g.temperature),
        max_completion_length=int(g.max_completion_length)).check()
  except ValueError as e:
    raise UserError(f"config.grpo: {e}") from None


def check_config(config):
  """The one-line errors about group bookkeeping, before anything is built or written."""
  g, t = config.grpo, config.train
  n_gen, bs = int(g.num_generations), int(t.batch_size)
  if n_gen < 1:
    raise UserError(f"config.grpo.num_generations={n_gen}: must be >= 1")
  if g.scale_rewards not in losses.SCALE_REWARDS:
    raise UserError(f"config.grpo.scale_rewards={g.scale_rewards!r}: expected one of "
                    f"{', '.join(losses.SCALE_REWARDS)}")
  if n_gen == 1 and g.scale_rewards == "group":
    raise UserError("config.grpo.num_generations=1 with scale_rewards=group: a group of one has "
                    "no spread (every advantage is 0); use num_generations >= 2")
  if bs % n_gen:
    raise UserError(f"config.train.batch_size={bs} is not divisible by "
                    f"config.grpo.num_generations={n_gen} (batch_size counts completions)")
  if int(g.num_iterations) < 1:
    raise UserError(f"config.grpo.num_iterations={g.num_iterations}: must be >= 1")
  if float(g.temperature) <= 0:
    raise UserError(f"config.grpo.temperature={g.temperature}: GRPO samples, it must be > 0")
  if not 0.0 <= float(g.warm_start_carry_drop) <= 1.0:
    raise UserError(f"config.grpo.warm_start_carry_drop={g.warm_start_carry_drop}: a fraction "
                    "of the warm start's problems, in [0, 1]")


def warm_start_sft(config, workdir):
  from experiments import sft as sft_exp
  return sft_exp.run(config, workdir)


def warm_start_export(workdir, out):
  from ftjax import export
  return export.export(workdir, out, "merged")


def dry_run_rewards(reward_fns, weights, rows, n: int = 2):
  """Every reward on the first `n` rows with an empty completion (a model may well write one),
  so that a missing column or a reward that raises stops the run before anything is written,
  not after the first rollout."""
  rows = rows[:n]
  if not rows:
    return
  chat = isinstance(rows[0]["prompt"], list)
  completions = [[{"role": "assistant", "content": ""}] if chat else "" for _ in rows]
  keys = sorted({k for r in rows for k in r if k not in ("prompt", "completion")})
  columns = {k: [r.get(k) for r in rows] for k in keys}
  columns["completion_ids"] = [[] for _ in rows]
  rewards.score(reward_fns, weights, [r["prompt"] for r in rows], completions, columns)


def score(reward_fns, weights, rows, texts, ro, g: int):
  """Rewards of every completion; prompts and columns repeated per sample (TRL's layout)."""
  chat = isinstance(rows[0]["prompt"], list)
  completions = [[{"role": "assistant", "content": x}] for x in texts] if chat else texts
  prompts = [r["prompt"] for r in rows for _ in range(g)]
  keys = sorted({k for r in rows for k in r if k not in ("prompt", "completion")})
  columns = {k: [r.get(k) for r in rows for _ in range(g)] for k in keys}
  columns["completion_ids"] = rollout.completion_ids(ro)
  return rewards.score(reward_fns, weights, prompts, completions, columns)


@wd.exclusive  # one run per workdir; a file or read-only disk is refused first
def run(config, workdir: str) -> dict:
  # ---- setup: config, data and rewards are checked before anything is written
  common.validate(config)
  t, g = config.train, config.grpo
  check_config(config)
  s = settings(config)
  n_gen = int(g.num_generations)
  n_prompts = int(t.batch_size) // n_gen
  task = tasks.of(config)
  train_rows, eval_rows = tasks.prompt_rows(config)
  reward_fns = [rewards.from_spec(x, tasks.named_rewards()) for x in g.rewards]
  if not reward_fns:
    raise UserError("config.grpo.rewards is empty: give at least one reward")
  weights = [float(w) for w in g.reward_weights] or None
  dry_run_rewards(reward_fns, weights, train_rows)
  dry_run_rewards(reward_fns, weights, eval_rows)
  # The task may bring its tokenizer and model (paths set in the config before the resume check)
  build_task = task.prepare(config, workdir, warm_start_sft, warm_start_export) if hasattr(
      task, "prepare") else None
  drift = wd.check_resume(config, workdir)  # a resume with a changed config is refused
  par = setup.parallel(config)
  par.check_batch(int(t.batch_size))
  if build_task:
    build_task()
  model, params, tok, base_ref = setup.build_model(config, par=par)
  trainable, frozen, labels = common.split_params(params, setup.rules(config))
  # The reference: adapters off over the same params, or the initial trainable leaves (a copy:
  # the step donates the live ones); none at all when beta == 0.
  ref_model = lora.disable(model) if config.adapter.kind != "none" else model
  ref_trainable = jax.tree_util.tree_map(jnp.copy, trainable) if s.beta else None
  schedule, tx = setup.optimizer(config)
  state = loop.init_state(par, trainable, tx, t.seed)
  logging.info("%s", partition.format_summary(partition.summary(params, labels,
                                                                state["opt_state"])))
  del params, trainable
  eos, pad = rollout.eos_ids(tok, model), rollout.pad_id(tok)

  def build_data(data_state):
    return prompt_data.PromptIterator(train_rows, n_prompts, int(t.seed), data_state)

  # ---- restore
  ckpt, state, data, start = loop.restore(workdir, t, state, base_ref, build_data(None),
                                          build_data,
                                          begin=lambda: wd.start_run(config, workdir, drift))
  step_fn = par.compile(lambda axis: grpo_train.make_step(
      model, tx, schedule, s, grad_accum=int(t.grad_accum), axis_name=axis,
      chunk=int(t.logprob_chunk)), state, frozen)
  ref_lp = rollout.make_logprob_fn(ref_model, temperature=s.temperature,
                                   chunk=int(t.logprob_chunk)) if s.beta else None
  frozen_host = frozen
  state, frozen = par.state(state), par.frozen(frozen)
  writer, bar = loop.open_logs(workdir, t.steps, start)
  extra = {"base": base_ref}
  rollout_kw = dict(max_new_tokens=int(g.max_completion_length), eos_ids=eos, pad_id=pad,
                    prompt_len=int(g.max_prompt_len))
  last = {}

  def policy():
    return partition.merge(par.host_state(state)["params"], frozen_host)

  def save(step, eval_metrics=None):
    ckpt.save(step, par.host_state(state), data.state, eval_metrics, extra)

  def run_eval():
    """Greedy completions of the held-out prompts, scored by the rewards; pass@1 (greedy) and
    pass@G (any of G samples at the rollout temperature) count a prompt solved when the first
    reward function reaches 1 (a right answer for answer_match)."""
    out = {}
    for i in range(0, len(eval_rows), n_prompts):
      rows = eval_rows[i:i + n_prompts]
      rows = rows + [rows[-1]] * (n_prompts - len(rows))  # one shape: no recompile
      keep = min(n_prompts, len(eval_rows) - i)
      ids = [prompt_data.encode(tok, r["prompt"]) for r in rows]
      kw = {**rollout_kw, "max_new_tokens": int(g.eval_max_new_tokens or g.max_completion_length)}
      ro = rollout.rollout(model, policy(), ids, n_samples=1, rng=jax.random.PRNGKey(0),
                           temperature=0.0, **kw)
      total, per_fn, names = score(reward_fns, weights, rows, rollout.decode(tok, ro), ro, 1)
      for k, v in [("reward", total)] + [(f"rewards/{n}", per_fn[:, j])
                                         for j, n in enumerate(names)]:
        out.setdefault(k, []).extend(v[:keep].tolist())
      out.setdefault("pass_at_1", []).extend((per_fn[:keep, 0] >= 1).tolist())
      if not g.eval_pass_at_g:
        continue
      ro = rollout.rollout(model, policy(), ids, n_samples=n_gen, rng=jax.random.PRNGKey(1),
                           temperature=s.temperature, top_k=int(g.top_k), top_p=float(g.top_p),
                           **kw)
      _, per_fn, _ = score(reward_fns, weights, rows, rollout.decode(tok, ro), ro, n_gen)
      solved = (np.nan_to_num(per_fn[:, 0], nan=0.0) >= 1).reshape(n_prompts, n_gen)
      out.setdefault(f"pass_at_{n_gen}", []).extend(solved[:keep].any(1).tolist())
    return {f"eval_{k}": float(np.nanmean(v)) for k, v in out.items()}

  before = {}
  if start == 0 and eval_rows:  # the starting point, for before/after
    before = {f"{k}_before": v for k, v in run_eval().items()}
    writer.write(0, before)
    logging.info("step 0: %s", before)

  # ---- loop: rollout -> score -> advantages -> update(s) -> log -> eval -> save
  with loop.closing(ckpt, bar, writer):
    with checkpoint.PreemptionHandler() as preempt:
      step = start
      while step < t.steps:
        rows = data.next()
        ids = [prompt_data.encode(tok, r["prompt"]) for r in rows]
        t0 = time.perf_counter()
        # The rollout key depends only on the seed and the step: a resume draws the same samples.
        key = jax.random.fold_in(jax.random.PRNGKey(int(t.seed) + 1), step)
        ro = rollout.rollout(model, policy(), ids, n_samples=n_gen, rng=key,
                             temperature=s.temperature, top_k=int(g.top_k),
                             top_p=float(g.top_p), **rollout_kw)
        t1 = time.perf_counter()
        total, per_fn, names = score(reward_fns, weights, rows, rollout.decode(tok, ro), ro,
                                     n_gen)
        adv, zero_std = (np.asarray(x) for x in losses.grpo_advantages(
            jnp.asarray(total), n_gen, g.scale_rewards))
        ref = None
        if s.beta:
          ref = ref_lp(partition.merge(ref_trainable, frozen_host), ro)
        batch = par.batch(grpo_train.step_batch(ro, adv, ref))
        t2 = time.perf_counter()
        for _ in range(int(g.num_iterations)):
          state, m = step_fn(state, frozen, batch)
        m = jax.device_get(par.metrics(m))
        step += 1
        if loop.due(step, t.log_every, t.steps):
          host = {**grpo_train.host_metrics(m, s),
                  **grpo_train.rollout_metrics(ro, total, per_fn, names, zero_std, n_gen),
                  "rollout_seconds": t1 - t0, "update_seconds": time.perf_counter() - t2}
          last = loop.log(step, host, writer, bar, hint="lower optim.lr")
        eval_metrics = loop.eval_and_save(step, t, eval_rows, run_eval, writer, save)
        last = {**last, **(eval_metrics or {})}
        if loop.stop_requested(preempt, step):
          break
    # ---- final save
    save(step)
    ckpt.wait()
  return loop.finish(preempt, step, workdir, {**before, **last})


def main(argv):
  del argv
  if FLAGS.workdir is None or FLAGS.config is None:
    raise app.UsageError("--config and --workdir are required")
  logging.info("done: %s", run(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
  cli.run(main, define_flags)
