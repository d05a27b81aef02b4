"""Direct preference optimisation (sigmoid, IPO, hinge, robust/cDPO) from an SFT model.

The reference model (`train/reference.py`) is the same params with the adapters switched off
when training adapters (no second copy in memory), a frozen copy of the initial params for full
fine-tuning, or log-probabilities precomputed in one pass (`dpo.reference=precomputed`).
`run(config, workdir)` is what `experiments/dpo.py` runs: logged per step are rewards/chosen,
rewards/rejected, rewards/accuracies, rewards/margins, the logps of both sides and the
per-token policy-to-reference KL on chosen responses. Batches are preference batches
(`ftjax.train.preference`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ftjax import checkpoint, heads, losses, partition
from ftjax import workdir as wd
from ftjax.data import kto as kto_data
from ftjax.data import preference as pref_data
from ftjax.errors import UserError
from ftjax.train import common, loop, preference, reference, setup

REFERENCES = ("auto", "precomputed")


def _hidden(model, params, batch, rng=None):
  """Final hidden states [2B, T, D] of the input rows."""
  seg = batch["segment_ids"]
  return model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                     mask=seg > 0, return_hidden=True,
                     rngs=None if rng is None else {"dropout": rng})


def side_token_logps(model, params, batch, rng=None, chunk: int = 0) -> jax.Array:
  """Per-token response logprobs [2B, T], 0 off the response; `chunk` as `token_logprobs`."""
  hidden = _hidden(model, params, batch, rng)
  head = lambda h: heads.lm_logits(params, h, model.cfg)
  return losses.token_logprobs(hidden, head, batch["targets"], batch["weights"] != 0, chunk)


def side_logps(model, params, batch, rng=None, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Summed and mean response logprobs per row: ([2B], [2B]); `chunk` as `token_logprobs`."""
  tok = side_token_logps(model, params, batch, rng, chunk)
  return losses.sequence_logps_sum_and_mean(tok, batch["weights"])


# ---- TRL 1.16's whole DPO loss (dpo.loss_type beyond the original four, or a list of them) ----

def loss_options(d) -> dict | None:
  """The `dpo` section as `multi_pair_losses` options, or None when it asks for nothing beyond
  `losses.dpo_loss` (one of its four types, no weights, reverse KL, no ld_alpha): those runs
  keep the original code path. Raises UserError naming the key for a bad value."""
  get = lambda k, default: d.get(k, default) if hasattr(d, "get") else getattr(d, k, default)
  raw = get("loss_type", "sigmoid")
  types = ([t.strip() for t in raw.replace("+", ",").split(",") if t.strip()]
           if isinstance(raw, str) else [str(t) for t in raw])
  wraw = get("loss_weights", "")
  weights = ([w for w in str(wraw).replace("+", ",").split(",") if w.strip()]
             if isinstance(wraw, str) else list(wraw or []))
  ld_alpha = get("ld_alpha", None)
  opts = dict(loss_types=tuple(types), loss_weights=None, beta=float(get("beta", 0.1)),
              label_smoothing=float(get("label_smoothing", 0.0)),
              f_divergence_type=get("f_divergence_type", "reverse_kl"),
              f_alpha_divergence_coef=float(get("f_alpha_divergence_coef", 0.5)),
              discopop_tau=float(get("discopop_tau", 0.05)),
              ld_alpha=None if ld_alpha is None else float(ld_alpha))
  try:
    weights = [float(w) for w in weights]
  except ValueError:
    raise UserError(f"config.dpo.loss_weights={wraw!r}: expected numbers, comma separated") \
        from None
  try:
    opts["loss_weights"] = losses.check_dpo_options(
        types, weights, opts["label_smoothing"], opts["f_divergence_type"], opts["ld_alpha"])
  except ValueError as e:
    raise UserError(f"config.{e}") from None
  legacy = (len(types) == 1 and types[0] in losses.DPO_LOSS_TYPES and weights in ([], [1.0])
            and opts["f_divergence_type"] == "reverse_kl" and opts["ld_alpha"] is None)
  return None if legacy else opts


def multi_pair_losses(tok, ref, weights, valid, opts: dict):
  """TRL's `DPOTrainer._compute_loss` on per-token logps; returns (losses [B], aux sums).

  Args:
    tok: float [2B, T] policy per-token logps (0 off the response), rows chosen then rejected.
    ref: float [2B, T] reference per-token logps, or [2B] summed ones (precomputed, no ld_alpha).
    weights: float [2B, T], 1 on response tokens; valid: float [B], 1 per real pair.
    opts: `loss_options`' dict.
  """
  kw = dict(opts)
  ld_alpha = kw.pop("ld_alpha")
  sums = (tok * weights).sum(-1)  # [2B]
  if ld_alpha is None:
    seq_of = lambda t: (t * weights).sum(-1)
  else:
    seq_of = lambda t: losses.ld_weighted_logps(t, weights, ld_alpha)
  seq = seq_of(tok)
  ref_seq = ref if ref.ndim == 1 else seq_of(ref)
  ref_sums = ref if ref.ndim == 1 else (ref * weights).sum(-1)
  lens = weights.sum(-1)
  b = seq.shape[0] // 2
  per_pair, rc, rr = losses.dpo_multi_loss(
      seq[:b], seq[b:], ref_seq[:b], ref_seq[b:], chosen_lengths=lens[:b],
      rejected_lengths=lens[b:], chosen_token_logps_sum=sums[:b], valid=valid, **kw)
  n_chosen = jnp.maximum(lens[:b], 1.0)
  aux = {**losses.dpo_metric_sums(rc, rr, seq[:b], seq[b:], valid),
         "kl/chosen": jax.lax.stop_gradient(((sums[:b] - ref_sums[:b]) / n_chosen) * valid).sum()}
  return per_pair, aux


def _multi_loss_fn(params, batch, rng, *, model, ref_model, ref_params_fn, opts, chunk):
  tok = side_token_logps(model, params, batch, rng, chunk)
  if "ref_logps" in batch:
    ref = batch["ref_logps"]
  else:
    ref = jax.lax.stop_gradient(side_token_logps(
        ref_model, jax.lax.stop_gradient(ref_params_fn(params)), batch, chunk=chunk))
  valid = preference.valid_pairs(batch)
  per_pair, aux = multi_pair_losses(tok, ref, batch["weights"].astype(jnp.float32), valid, opts)
  return per_pair.sum(), valid.sum(), aux


# ---- reference-free pair losses: ORPO and CPO/SimPO (trl.experimental.orpo / .cpo) --------

CPO_DEFAULTS = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, cpo_alpha=1.0,
                    simpo_gamma=0.5, alpha=0.0)


def _chosen_token_mean(tok, mask, valid):
  """Mean logprob over the chosen rows' `mask` tokens of the real pairs: float32 scalar (TRL's
  NLL is a cross-entropy averaged over all those tokens of the batch)."""
  b = valid.shape[0]
  m = mask[:b].astype(jnp.float32) * valid[:, None]
  return (tok[:b] * m).sum() / jnp.maximum(m.sum(), 1.0)


def orpo_pair_losses(tok_all, weights, seg, valid, beta: float):
  """trl.experimental.orpo's loss on per-token logps; returns (losses [B], aux sums).

  loss = NLL(chosen, prompt AND response tokens, as TRL) - mean(beta * logsigmoid(log odds)),
  the odds from the MEAN response logps. Summed over the real pairs, the losses give n times it.

  Args:
    tok_all: float [2B, T] logps of every target token (prompt included; 0 on padding).
    weights: float [2B, T], 1 on response tokens; seg: [2B, T], > 0 on every target token.
    valid: float [B], 1 per real pair.
  """
  m = weights.astype(jnp.float32)
  means = (tok_all * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)  # [2B]
  b = valid.shape[0]
  nll = -_chosen_token_mean(tok_all, seg > 0, valid)
  ratio_losses, rc, rr, ratio, log_odds = losses.orpo_loss(means[:b], means[b:], beta)
  per_pair = (nll - ratio_losses) * valid
  aux = {**losses.dpo_metric_sums(rc, rr, means[:b], means[b:], valid),
         "nll_loss": jax.lax.stop_gradient(nll) * valid.sum(),
         "log_odds_ratio": (ratio * valid).sum(), "log_odds_chosen": (log_odds * valid).sum()}
  return per_pair, aux


def cpo_pair_losses(tok, weights, valid, c: dict):
  """trl.experimental.cpo's loss (CPO, SimPO, AlphaPO): mean(cpo_loss) + cpo_alpha * NLL of the
  chosen responses; returns (losses [B], aux sums) as `orpo_pair_losses`.

  Args:
    tok: float [2B, T] response logps (0 elsewhere); weights: float [2B, T]; valid: float [B].
    c: CPO_DEFAULTS' keys. "ipo" and "simpo" use mean response logps, the others sums (TRL).
  """
  m = weights.astype(jnp.float32)
  sums = (tok * m).sum(-1)
  seq = sums / jnp.maximum(m.sum(-1), 1.0) if c["loss_type"] in ("ipo", "simpo") else sums
  b = valid.shape[0]
  per, rc, rr = losses.cpo_loss(seq[:b], seq[b:], beta=float(c["beta"]),
                                loss_type=c["loss_type"],
                                label_smoothing=float(c["label_smoothing"]),
                                simpo_gamma=float(c["simpo_gamma"]), alpha=float(c["alpha"]))
  nll = (-_chosen_token_mean(tok, m > 0, valid) if float(c["cpo_alpha"]) != 0.0
         else jnp.zeros((), jnp.float32))
  per_pair = (per + float(c["cpo_alpha"]) * nll) * valid
  aux = {**losses.dpo_metric_sums(rc, rr, seq[:b], seq[b:], valid),
         "nll_loss": jax.lax.stop_gradient(nll) * valid.sum()}
  return per_pair, aux


def orpo_loss_fn(params, batch, rng, *, model, beta: float, chunk: int = 0):
  """ORPO over one batch: (sum of pair losses, pairs, aux sums). No reference forward."""
  hidden = _hidden(model, params, batch, rng)
  head = lambda h: heads.lm_logits(params, h, model.cfg)
  seg = batch["segment_ids"]
  tok_all = losses.token_logprobs(hidden, head, batch["targets"], seg > 0, chunk)
  valid = preference.valid_pairs(batch)
  per_pair, aux = orpo_pair_losses(tok_all, batch["weights"], seg, valid, beta)
  return per_pair.sum(), valid.sum(), aux


def cpo_loss_fn(params, batch, rng, *, model, cpo: dict, chunk: int = 0):
  """CPO / SimPO over one batch: (sum of pair losses, pairs, aux sums). No reference forward."""
  tok = side_token_logps(model, params, batch, rng, chunk)
  valid = preference.valid_pairs(batch)
  per_pair, aux = cpo_pair_losses(tok, batch["weights"], valid, cpo)
  return per_pair.sum(), valid.sum(), aux


# ---- KTO (TRL's KTOTrainer) on unpaired rows: batches of `ftjax.data.kto` ------------------

KTO_DEFAULTS = dict(beta=0.1, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0)


def kto_example_losses(sums, ref_sums, labels, valid, k: dict):
  """TRL's `KTOTrainer._compute_loss` on summed logps; returns (losses [B], aux sums).

  Args:
    sums, ref_sums: float [2B] policy and reference summed completion logps, rows [0, B) the
      examples and [B, 2B) their KL (mismatched) sequences.
    labels: float [B], 1 desirable, 0 undesirable; valid: float [B], 1 per real example.
    k: KTO_DEFAULTS' keys.
  The KL estimate z0 is the mean over the real KL rows of policy - reference logps, clamped at
  0 and without gradient; "apo_zero_unpaired" uses none (0). Summed over the real examples the
  losses give n times TRL's mean. The aux sums hold per-label sums and counts that
  `kto_metrics` turns into TRL's per-label means.
  """
  b = valid.shape[0]
  if k["loss_type"] == "kto":
    kl = ((sums[b:] - ref_sums[b:]) * valid).sum() / jnp.maximum(valid.sum(), 1.0)
    kl = jnp.maximum(jax.lax.stop_gradient(kl), 0.0)
  else:
    kl = jnp.zeros((), jnp.float32)
  per, rewards = losses.kto_loss(sums[:b], ref_sums[:b], labels, kl, beta=float(k["beta"]),
                                 desirable_weight=float(k["desirable_weight"]),
                                 undesirable_weight=float(k["undesirable_weight"]),
                                 loss_type=k["loss_type"])
  good, bad = labels * valid, (1 - labels) * valid
  sg = jax.lax.stop_gradient
  aux = {"kl": kl * valid.sum(), "count/chosen": good.sum(), "count/rejected": bad.sum(),
         "rewards/chosen": (rewards * good).sum(), "rewards/rejected": (rewards * bad).sum(),
         "logps/chosen": sg(sums[:b] * good).sum(), "logps/rejected": sg(sums[:b] * bad).sum()}
  return per * valid, aux


def kto_metrics(m: dict, prefix: str = "") -> dict:
  """Per-label sums (`kto_example_losses`, already divided by the example count) -> TRL's
  per-label means (sum / count of that label) and rewards/margins; drops the counts."""
  m = dict(m)
  c, r = m.pop(prefix + "count/chosen", 0.0), m.pop(prefix + "count/rejected", 0.0)
  for side, n in (("chosen", c), ("rejected", r)):
    for what in ("rewards", "logps"):
      key = f"{prefix}{what}/{side}"
      if key in m:
        if n > 0:
          m[key] = m[key] / n
        else:
          del m[key]  # TRL logs nothing for a label the batch lacks
  if prefix + "rewards/chosen" in m and prefix + "rewards/rejected" in m:
    m[prefix + "rewards/margins"] = m[prefix + "rewards/chosen"] - m[prefix + "rewards/rejected"]
  return m


def kto_loss_fn(params, batch, rng, *, model, ref_model, ref_params_fn, kto: dict,
                chunk: int = 0):
  """KTO over one batch: (sum of example losses, examples, aux sums)."""
  sums = side_logps(model, params, batch, rng, chunk)[0]
  ref_sums = jax.lax.stop_gradient(side_logps(
      ref_model, jax.lax.stop_gradient(ref_params_fn(params)), batch, chunk=chunk)[0])
  b = sums.shape[0] // 2
  # The KL rows give only the (gradient-free) reference point, as TRL's no_grad pass.
  sums = jnp.concatenate([sums[:b], jax.lax.stop_gradient(sums[b:])])
  valid = preference.valid_pairs(batch)
  per, aux = kto_example_losses(sums, ref_sums, batch["kto_label"][:b], valid, kto)
  return per.sum(), valid.sum(), aux


def _reference_free_options(config, method: str) -> dict:
  """The `orpo` / `cpo` section, checked (UserError naming the key)."""
  if method == "orpo":
    c = {"beta": config.orpo.beta}
  elif method == "kto":
    c = {k: config.kto.get(k, v) for k, v in KTO_DEFAULTS.items()}
    if c["loss_type"] not in losses.KTO_LOSS_TYPES:
      raise UserError(f"config.kto.loss_type={c['loss_type']!r}: unknown loss type; expected one "
                      f"of {', '.join(losses.KTO_LOSS_TYPES)}")
    for key in ("desirable_weight", "undesirable_weight"):
      w = c[key]
      if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
        raise UserError(f"config.kto.{key}={w!r}: expected a number >= 0")
  else:
    c = {k: config.cpo.get(k, v) for k, v in CPO_DEFAULTS.items()}
    if c["loss_type"] not in losses.CPO_LOSS_TYPES:
      raise UserError(f"config.cpo.loss_type={c['loss_type']!r}: unknown loss type; expected one "
                      f"of {', '.join(losses.CPO_LOSS_TYPES)}")
    if not 0.0 <= float(c["label_smoothing"]) < 0.5:
      raise UserError(f"config.cpo.label_smoothing={c['label_smoothing']!r}: expected [0, 0.5)")
  beta = c["beta"]
  if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
    raise UserError(f"config.{method}.beta={beta!r}: expected a number > 0")
  return c


def dpo_loss_fn(params, batch, rng, *, model, ref_model, ref_params_fn, beta: float,
                loss_type: str, label_smoothing: float, chunk: int = 0, opts=None):
  """DPO family over one batch; returns (sum of pair losses, pairs, aux sums).

  The reference log-probabilities come from `batch["ref_logps"]` ([2B], precomputed) when
  present, else from `ref_model` on `ref_params_fn(params)`: the same params with the
  adapters switched off (no second copy of the model), or a frozen initial copy. `opts`
  (`loss_options`) switches to TRL's whole loss (`multi_pair_losses`).
  """
  if opts is not None:
    return _multi_loss_fn(params, batch, rng, model=model, ref_model=ref_model,
                          ref_params_fn=ref_params_fn, opts=opts, chunk=chunk)
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
  valid = preference.valid_pairs(batch)
  n_chosen = jnp.maximum(batch["weights"][:b].sum(-1), 1.0)
  aux = {**losses.dpo_metric_sums(rc, rr, sums[:b], sums[b:], valid),
         # Per-token KL(policy || reference) estimated on the chosen responses.
         "kl/chosen": jax.lax.stop_gradient(((sums[:b] - ref_sums[:b]) / n_chosen) * valid).sum()}
  return (per_pair * valid).sum(), valid.sum(), aux


def make_dpo_step(model, ref_model, ref_params_fn, tx, schedule, *, beta, loss_type,
                  label_smoothing=0.0, grad_accum=1, axis_name=None, chunk=0, opts=None):
  loss_fn = functools.partial(dpo_loss_fn, model=model, ref_model=ref_model,
                              ref_params_fn=ref_params_fn, beta=beta, loss_type=loss_type,
                              label_smoothing=label_smoothing, chunk=chunk, opts=opts)
  return functools.partial(common.update_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                           grad_accum=grad_accum, axis_name=axis_name)


def precompute_reference(ref_model, ref_params, batches, chunk: int = 0) -> dict:
  """Reference (sum, mean) logps keyed by each row's bytes: one pass before training."""
  fn = jax.jit(lambda p, b: side_logps(ref_model, p, b, chunk=chunk))
  table = {}
  for batch in batches:
    sums, means = map(np.asarray, jax.device_get(fn(ref_params, batch)))
    for i in range(len(sums)):
      table[_row_key(batch, i)] = (float(sums[i]), float(means[i]))
  return table


def _row_key(batch, i):
  return batch["inputs"][i].tobytes() + batch["weights"][i].tobytes()


def attach_reference(batch: dict, table: dict) -> dict:
  """`batch` with its rows' precomputed reference logps (`precompute_reference`)."""
  vals = [table[_row_key(batch, i)] for i in range(batch["inputs"].shape[0])]
  return {**batch, "ref_logps": np.array([v[0] for v in vals], np.float32),
          "ref_logps_mean": np.array([v[1] for v in vals], np.float32)}


@wd.exclusive  # one run per workdir; a file or read-only disk is refused first
def run(config, workdir: str) -> dict:
  """Train; returns the last logged metrics (and eval metrics) as floats."""
  return train_pairs(config, workdir, "dpo")


METHODS = ("dpo", "orpo", "cpo", "kto")


def train_pairs(config, workdir: str, method: str = "dpo") -> dict:
  """The preference-pair loop of `run` (DPO), ORPO (`train/orpo.py`) and CPO/SimPO
  (`train/cpo.py`). The reference-free methods build no reference: no second forward, no copy
  of the params. Call it through a `wd.exclusive` run."""
  # ---- setup: config, model and data are checked before anything is written
  common.validate(config)
  t = config.train
  free = None
  if method == "dpo":
    d = config.dpo
    if d.reference not in REFERENCES:
      raise UserError(f"config.dpo.reference={d.reference!r}: expected auto or precomputed")
    opts = loss_options(d)
    if opts is not None and opts["ld_alpha"] is not None and d.reference == "precomputed":
      raise UserError("config.dpo.ld_alpha needs dpo.reference=auto (the precomputed table holds "
                      "one sum per row; LD-DPO's split depends on both sides of the pair)")
    precomputed = d.reference == "precomputed"
  else:
    free = _reference_free_options(config, method)
    precomputed = False
  needs_ref = free is None or method == "kto"
  drift = wd.check_resume(config, workdir)  # a resume with a changed config is refused
  par = setup.parallel(config)
  par.check_batch(int(t.batch_size))
  model, params, tok, base_ref = setup.build_model(config, par=par)
  rules = setup.rules(config)
  ref = None
  if needs_ref:
    ref = reference.policy(model, config, params, rules, precomputed=precomputed)
  state, frozen, schedule, tx, _ = loop.init(config, par, params, rules)
  if ref is not None:
    frozen = {**frozen, **ref.frozen}
  # The initial params live on only for a precomputed reference, until its table is built.
  init_params = params if precomputed else None
  del params
  build = kto_data.build_kto_dataset if method == "kto" else pref_data.build_preference_dataset
  build_data = loop.data_builder(build, config, tok, workdir)

  # ---- restore (a fresh run reads its data first, so a bad file leaves no workdir)
  ckpt, state, data, start = loop.restore(workdir, t, state, base_ref, build_data,
                                          begin=lambda: wd.start_run(config, workdir, drift))
  logging.info("preference data: %s", data.stats)
  eval_batches = loop.eval_batches(data, t)
  table = None
  if precomputed:
    table = precompute_reference(ref.model, init_params,
                                 pref_data.eval_batches(data.train.examples, int(t.batch_size),
                                                        int(t.seq_len), pad_id=data.pad_id)
                                 + eval_batches, int(t.logprob_chunk))
    del init_params

  if free is None:
    dpo_kw = dict(beta=float(d.beta), loss_type=d.loss_type,
                  label_smoothing=float(d.label_smoothing), chunk=int(t.logprob_chunk),
                  opts=opts)
    step_fn = par.compile(lambda axis: make_dpo_step(
        model, ref.model, ref.params_fn, tx, schedule, grad_accum=int(t.grad_accum),
        axis_name=axis, **dpo_kw), state, frozen, schedule)
    eval_fn = loop.jit_eval(par, lambda tr, frz, b: dpo_loss_fn(
        partition.merge(tr, frz), b, None, model=model, ref_model=ref.model,
        ref_params_fn=ref.params_fn, **dpo_kw), frozen)
  else:
    chunk = int(t.logprob_chunk)
    if method == "orpo":
      loss_fn = functools.partial(orpo_loss_fn, model=model, beta=float(free["beta"]), chunk=chunk)
    elif method == "kto":
      loss_fn = functools.partial(kto_loss_fn, model=model, ref_model=ref.model,
                                  ref_params_fn=ref.params_fn, kto=free, chunk=chunk)
    else:
      loss_fn = functools.partial(cpo_loss_fn, model=model, cpo=free, chunk=chunk)
    step_fn = par.compile(lambda axis: functools.partial(
        common.update_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
        grad_accum=int(t.grad_accum), axis_name=axis), state, frozen, schedule)
    eval_fn = loop.jit_eval(par, lambda tr, frz, b: loss_fn(partition.merge(tr, frz), b, None),
                            frozen)
  prep = (lambda b: attach_reference(b, table)) if table is not None else (lambda b: b)
  eval_batches = [prep(b) for b in eval_batches]
  state, frozen = par.state(state), par.frozen(frozen)
  writer, bar = loop.open_logs(workdir, t.steps, start)
  extra = {"base": base_ref}
  last = {}

  def save(step, eval_metrics=None):
    ckpt.save(step, par.host_state(state), data.train.state, eval_metrics, extra)

  def run_eval():
    # The held-out pair accuracy with its counts (a Wilson interval), as reward.py gives it.
    out = loop.evaluate(eval_fn, par.host_state(state)["params"], eval_batches,
                        rates=("rewards/accuracies",))
    return kto_metrics(out, "eval_") if method == "kto" else out

  # ---- loop
  with loop.closing(ckpt, bar, writer):
    with checkpoint.PreemptionHandler() as preempt:
      step = start
      while step < t.steps:
        batch = par.pair_batch(prep(next(data.train)), int(t.grad_accum))
        state, m = step_fn(state, frozen, batch)
        step += 1
        if loop.due(step, t.log_every, t.steps):
          m = preference.per_pair_means(jax.device_get(par.metrics(m)))
          if method == "kto":
            m = kto_metrics(m)
          last = loop.log(step, m, writer, bar, hint=f"lower optim.lr or {method}.beta")
        eval_metrics = loop.eval_and_save(step, t, eval_batches, run_eval, writer, save)
        last = {**last, **(eval_metrics or {})}
        if loop.stop_requested(preempt, step):
          break
    # ---- final save
    save(step)
    ckpt.wait()
  return loop.finish(preempt, step, workdir, last)
