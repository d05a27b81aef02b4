"""GRPO (and GSPO, DAPO, Dr. GRPO) from an SFT model, with rewards on sampled completions: the
loss and step over a scored rollout batch, the host-side pieces (batch assembly, metrics) and
the loop, `run(config, workdir)`, which `experiments/grpo.py` runs.

`loss_type="rloo"` is TRL's RLOOTrainer on the same rollout and step: leave-one-out
advantages (`normalize_advantages`, `reward_clip_range`), the KL (beta) as a reward penalty
from the sampler's and the reference's logps, one clipped ratio per sequence
(`ftjax.losses.rloo`). GRPO's scale_rewards, importance_sampling_level and delta do not apply.

Each step: G completions per prompt sampled from the params being trained (no copy, same
process), scored by the reward functions, advantages per group, then `grpo.num_iterations`
updates on that batch. The reference model (beta != 0, `train/reference.py`) is the same params
with the adapters off, or a frozen copy of the initial params for full fine-tuning. Rerunning
resumes exactly: the rollout rng is a function of the step, the prompt position is in the
checkpoint.

The step's batch (N = prompts * G rows; see `ftjax.rollout` for the first four arrays):
  prompt_tokens, prompt_mask [N, P]; completion_tokens, completion_mask [N, M]
  old_logprobs  float32 [N, M]  the sampler's behaviour logprobs (the policy at rollout time);
                                they equal `rollout.completion_logprobs` of those params, so the
                                first update's ratio is 1 to float32 rounding with no extra forward
  advantages    float32 [N]
  terminated    bool [N]
  ref_logprobs  float32 [N, M]  only when beta != 0 (one reference forward per rollout), and
                                not for rloo (its KL is in the advantages)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ftjax import checkpoint, export, heads, losses, partition, rewards, rollout, tasks
from ftjax import workdir as wd
from ftjax.data import prompts as prompt_data
from ftjax.errors import UserError
from ftjax.train import common, loop, reference, setup, sft


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
  """The loss's knobs, TRL's GRPOConfig names (RLOOConfig's for loss_type="rloo")."""
  loss_type: str = "dapo"  # or "rloo"
  beta: float = 0.0
  epsilon: float = 0.2
  epsilon_high: Optional[float] = None  # None: epsilon (symmetric clip)
  delta: Optional[float] = None
  importance_sampling_level: str = "token"
  mask_truncated_completions: bool = False
  temperature: float = 1.0
  max_completion_length: int = 0  # dr_grpo's constant; 0: the batch's M

  def check(self):
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f"loss_type={self.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if self.importance_sampling_level not in ("token", "sequence"):
      raise ValueError(f"importance_sampling_level={self.importance_sampling_level!r}")
    return self

  @property
  def sequence_level(self) -> bool:
    """One ratio (and clip count) per sequence rather than per token."""
    return self.loss_type == "rloo" or self.importance_sampling_level == "sequence"


LOSS_TYPES = losses.GRPO_LOSS_TYPES + ("rloo",)


def loss_mask(batch: dict, s: GRPOSettings) -> jax.Array:
  """The completion tokens that count: truncated completions drop out entirely when
  `mask_truncated_completions` (TRL zeroes their completion mask)."""
  m = batch["completion_mask"].astype(jnp.float32)
  if s.mask_truncated_completions:
    m = m * batch["terminated"].astype(jnp.float32)[:, None]
  return m


def grpo_loss_fn(params, batch, rng, *, model, settings: GRPOSettings, chunk: int = 0):
  """(loss_sum, count, aux sums) of one (micro-)batch, for `common.update_step`.

  aux sums (divide on the host, `host_metrics`): tokens, seqs, kl, entropy, clip counts.
  """
  s = settings
  logps, hidden = rollout.completion_logprobs(model, params, batch, temperature=s.temperature,
                                              chunk=chunk, return_hidden=True, rng=rng)
  mask = loss_mask(batch, s)
  if s.loss_type == "rloo":  # its KL is in the advantages: no reference term here
    loss_sum, n, aux = losses.rloo_loss_sum(logps, batch["old_logprobs"], batch["advantages"],
                                            mask, epsilon_low=s.epsilon,
                                            epsilon_high=s.epsilon_high)
  else:
    per_token, aux = losses.grpo_per_token_loss(
        logps, batch["old_logprobs"], batch["advantages"], mask,
        batch["ref_logprobs"] if s.beta else None, beta=s.beta, epsilon_low=s.epsilon,
        epsilon_high=s.epsilon_high, importance_sampling_level=s.importance_sampling_level,
        delta=s.delta)
    loss_sum, n = losses.grpo_loss_sum(per_token, mask, s.loss_type,
                                       s.max_completion_length or None)
  temp = s.temperature if s.temperature else 1.0
  entropy = losses.token_entropy(
      hidden, lambda h: heads.lm_logits(params, h, model.cfg) / temp, chunk)  # [N, M]
  sg = jax.lax.stop_gradient
  seq_level = s.sequence_level
  # TRL: clip fractions over tokens, or over sequences at the sequence level.
  clip_w = jnp.ones((mask.shape[0], 1)) if seq_level else mask
  sums = {
      "tokens": mask.sum(), "seqs": jnp.asarray(mask.shape[0], jnp.float32),
      "entropy": sg(entropy * mask).sum(),
      "clip_ratio/low_mean": sg(aux["low_clipped"] * clip_w).sum(),
      "clip_ratio/high_mean": sg(aux["high_clipped"] * clip_w).sum(),
      "clip_ratio/region_mean": sg((aux["low_clipped"] + aux["high_clipped"]) * clip_w).sum(),
      "ratio_mean": sg(jnp.broadcast_to(aux["ratio"], mask.shape) * mask).sum(),
  }
  if s.beta and s.loss_type != "rloo":  # rloo logs its KL from the rollout
    sums["kl"] = sg(aux["kl"] * mask).sum()
  return loss_sum, n, sums


def make_step(model, tx, schedule, settings: GRPOSettings, grad_accum: int = 1, axis_name=None,
              chunk: int = 0):
  """step(state, frozen, batch) -> (state, metrics); jitted (or pmapped) by the caller."""
  loss_fn = functools.partial(grpo_loss_fn, model=model, settings=settings.check(), chunk=chunk)
  return functools.partial(common.update_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                           grad_accum=grad_accum, axis_name=axis_name)


STEP_KEYS = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask",
             "old_logprobs", "advantages", "terminated", "ref_logprobs")


def step_batch(ro: dict, advantages: np.ndarray, ref_logprobs=None) -> dict:
  """The step's arrays from a rollout batch, its advantages and (beta != 0) reference logps."""
  out = {k: ro[k] for k in STEP_KEYS[:4]}
  out.update(old_logprobs=ro["logprobs"], advantages=np.asarray(advantages, np.float32),
             terminated=ro["terminated"])
  if ref_logprobs is not None:
    out["ref_logprobs"] = np.asarray(ref_logprobs, np.float32)
  return out


def host_metrics(m: dict, settings: GRPOSettings) -> dict:
  """Step metrics as floats: aux sums divided by their counts, under TRL's names."""
  m = {k: float(np.asarray(v)) for k, v in m.items()}
  tokens = max(m.pop("tokens"), 1.0)
  seqs = max(m.pop("seqs"), 1.0)
  clip_n = seqs if settings.sequence_level else tokens
  for k in list(m):
    if k.startswith("clip_ratio/"):
      m[k] /= clip_n
    elif k in ("entropy", "kl", "ratio_mean"):
      m[k] /= tokens
  return m


def rollout_metrics(ro: dict, total: np.ndarray, per_fn: np.ndarray, names: list,
                    std_is_zero: np.ndarray, group_size: int) -> dict:
  """Reward and completion statistics of one rollout, TRL's names where it has them."""
  lengths = ro["completion_mask"].sum(-1)
  out = {"reward": float(np.nanmean(total)) if np.isfinite(total).any() else float("nan"),
         "reward_std": float(np.nanstd(total, ddof=1)) if np.isfinite(total).sum() > 1 else 0.0,
         "frac_reward_zero_std": float(np.asarray(std_is_zero).reshape(-1, group_size)[:, 0]
                                       .mean()),
         "completions/mean_length": float(lengths.mean()),
         "completions/max_length": float(lengths.max()),
         "completions/min_length": float(lengths.min()),
         "completions/clipped_ratio": float(1.0 - ro["terminated"].mean()),
         "completions/terminated_ratio": float(ro["terminated"].mean())}
  for j, name in enumerate(names):
    col = per_fn[:, j]
    ok = np.isfinite(col)
    out[f"rewards/{name}/mean"] = float(col[ok].mean()) if ok.any() else float("nan")
    out[f"rewards/{name}/std"] = float(col[ok].std(ddof=1)) if ok.sum() > 1 else 0.0
  return out


# ---- the loop and its config


def settings_from(config) -> GRPOSettings:
  """The loss's settings from `config.grpo`; a bad one is a one-line UserError."""
  g = config.grpo
  try:
    return GRPOSettings(
        loss_type=g.loss_type, beta=float(g.beta), epsilon=float(g.epsilon),
        epsilon_high=float(g.epsilon_high) if g.epsilon_high else None,
        delta=float(g.delta) if g.delta else None,
        importance_sampling_level=g.importance_sampling_level,
        mask_truncated_completions=bool(g.mask_truncated_completions),
        temperature=float(g.temperature),
        max_completion_length=int(g.max_completion_length)).check()
  except ValueError as e:
    raise UserError(f"config.grpo.{e}") from None


def check_config(config):
  """The one-line errors about group bookkeeping, before anything is built or written."""
  g, t = config.grpo, config.train
  n_gen, bs = int(g.num_generations), int(t.batch_size)
  if n_gen < 1:
    raise UserError(f"config.grpo.num_generations={n_gen}: must be >= 1")
  check_rloo(g)
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


# RLOOConfig's options: keys of config.grpo only with `loss=rloo` (configs/grpo.py), so a GRPO
# config (and its saved config.json) is what it was; read with these defaults when absent.
RLOO_DEFAULTS = {"normalize_advantages": False, "reward_clip_range": ()}


def rloo_options(g) -> dict:
  return {k: g.get(k, v) for k, v in RLOO_DEFAULTS.items()}


def check_rloo(g):
  """RLOO's options, and GRPO's that it does not use (refused rather than silently ignored)."""
  o = rloo_options(g)
  if g.loss_type != "rloo":
    for k, v in o.items():
      if v != RLOO_DEFAULTS[k]:
        raise UserError(f"config.grpo.{k}={v!r} is an RLOO option: it needs "
                        "config.grpo.loss_type=rloo (configs/grpo.py:loss=rloo)")
    return
  if int(g.num_generations) < 2:
    raise UserError(f"config.grpo.num_generations={g.num_generations}: RLOO's leave-one-out "
                    "baseline needs >= 2 completions per prompt")
  for k, default in (("scale_rewards", "group"), ("importance_sampling_level", "token"),
                     ("delta", 0.0)):
    if (g[k] or 0.0) != default:
      raise UserError(f"config.grpo.{k}={g[k]!r} is a GRPO option that loss_type=rloo does not "
                      "use (RLOO: normalize_advantages, reward_clip_range)")
  clip = tuple(o["reward_clip_range"] or ())
  if clip and (len(clip) != 2 or not float(clip[0]) <= float(clip[1])):
    raise UserError(f"config.grpo.reward_clip_range={clip!r}: expected () or (min, max) with "
                    "min <= max")


def advantages(total: np.ndarray, n_gen: int, g, s: GRPOSettings, ro: dict, ref_logps):
  """(advantages [N], std_is_zero [N], extra rollout metrics): GRPO's group-normalised ones, or
  RLOO's leave-one-out ones with its reward-side KL (beta != 0) from the sampler's logps."""
  if s.loss_type != "rloo":
    adv, zero = losses.grpo_advantages(jnp.asarray(total), n_gen, g.scale_rewards)
    return np.asarray(adv), np.asarray(zero), {}
  o = rloo_options(g)
  kl, extra = None, {}
  if s.beta:
    m = np.asarray(ro["completion_mask"], np.float32)
    if s.mask_truncated_completions:  # as loss_mask: TRL's KL uses the zeroed mask
      m = m * np.asarray(ro["terminated"], np.float32)[:, None]
    kl = _sequence_kl_jit(jnp.asarray(ro["logprobs"]), jnp.asarray(ref_logps), jnp.asarray(m))
    extra["kl"] = float(np.asarray(kl).sum() / max(m.sum(), 1.0))  # TRL's kl: per token
  adv, zero = _rloo_advantages_jit(
      jnp.asarray(total), n_gen, normalize_advantages=bool(o["normalize_advantages"]), kl=kl,
      beta=s.beta, reward_clip_range=tuple(float(x) for x in o["reward_clip_range"]) or None)
  return np.asarray(adv), np.asarray(zero), extra


# One compiled program per run (its shapes and options are fixed) instead of op-by-op dispatch.
_rloo_advantages_jit = jax.jit(losses.rloo_advantages, static_argnames=(
    "group_size", "normalize_advantages", "beta", "reward_clip_range"))
_sequence_kl_jit = jax.jit(losses.sequence_kl)


def warm_start_export(workdir: str, out: str) -> str:
  """The task's warm start exports its SFT model merged, as experiments/export.py does."""
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
  """Train; returns the last logged metrics, eval metrics and the eval before training."""
  # ---- setup: config, data and rewards are checked before anything is written
  common.validate(config)
  t, g = config.train, config.grpo
  check_config(config)
  s = settings_from(config)
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
  build_task = task.prepare(config, workdir, sft.run, warm_start_export) if hasattr(
      task, "prepare") else None
  drift = wd.check_resume(config, workdir)  # a resume with a changed config is refused
  par = setup.parallel(config)
  par.check_batch(int(t.batch_size))
  if build_task:
    build_task()
  model, params, tok, base_ref = setup.build_model(config, par=par)
  rules = setup.rules(config)
  # No reference at all when beta == 0. Its copies stay out of the step's frozen params: the
  # reference runs once per rollout, outside the step.
  ref = reference.policy(model, config, params, rules) if s.beta else None
  state, frozen, schedule, tx, _ = loop.init(config, par, params, rules)
  del params
  eos, pad = rollout.eos_ids(tok, model), rollout.pad_id(tok)

  def build_data(data_state):
    return prompt_data.PromptIterator(train_rows, n_prompts, int(t.seed), data_state)

  # ---- restore
  ckpt, state, data, start = loop.restore(workdir, t, state, base_ref, build_data,
                                          begin=lambda: wd.start_run(config, workdir, drift))
  step_fn = par.compile(lambda axis: make_step(
      model, tx, schedule, s, grad_accum=int(t.grad_accum), axis_name=axis,
      chunk=int(t.logprob_chunk)), state, frozen, schedule)
  ref_lp = rollout.make_logprob_fn(ref.model, temperature=s.temperature,
                                   chunk=int(t.logprob_chunk)) if ref is not None else None
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
        t2 = time.perf_counter()
        ref_logps = None
        if ref is not None:
          ref_logps = jax.block_until_ready(ref_lp(ref.params_fn({**policy(), **ref.frozen}), ro))
        t3 = time.perf_counter()
        adv, zero_std, adv_metrics = advantages(total, n_gen, g, s, ro, ref_logps)
        batch = par.batch(step_batch(ro, adv, None if s.loss_type == "rloo" else ref_logps))
        t4 = time.perf_counter()
        # The update moves nothing between host and device: state, frozen params and the placed
        # batch are on device already (under pmap the batch is a host array pmap places).
        with (jax.transfer_guard("disallow") if par.mode == "pjit" else contextlib.nullcontext()):
          for _ in range(int(g.num_iterations)):
            state, m = step_fn(state, frozen, batch)
        m = jax.device_get(par.metrics(m))
        step += 1
        if loop.due(step, t.log_every, t.steps):
          host = {**host_metrics(m, s),
                  **rollout_metrics(ro, total, per_fn, names, zero_std, n_gen), **adv_metrics,
                  # Phases of the step, host seconds: sampling, reward scoring (decode +
                  # reward functions), reference forward, advantages + batch placement, the
                  # update(s) to their metrics on the host.
                  "rollout_seconds": t1 - t0, "score_seconds": t2 - t1,
                  "reference_seconds": t3 - t2, "advantages_seconds": t4 - t3,
                  "update_seconds": time.perf_counter() - t4}
          last = loop.log(step, host, writer, bar, hint="lower optim.lr")
        eval_metrics = loop.eval_and_save(step, t, eval_rows, run_eval, writer, save)
        last = {**last, **(eval_metrics or {})}
        if loop.stop_requested(preempt, step):
          break
    # ---- final save
    save(step)
    ckpt.wait()
  return loop.finish(preempt, step, workdir, {**before, **last})

