"""Process reward model: a step classifier (token-classification head) on the decoder.

Trained on TRL's PRM layout (prompt, completions: the steps, labels: one bool per step;
`ftjax.data.prm`): cross-entropy of the 2-class head (0 a bad step, 1 a good one) at each step's
separator token, every other position ignored, as TRL's PRMTrainer does with an
AutoModelForTokenClassification. `run(config, workdir)` is what `experiments/prm.py` runs.
Logged: loss, step accuracy, and precision / recall / F1 on the bad steps (the class a verifier
is for), in training and on the held-out rows. Exports as *ForTokenClassification
(`experiments/export.py`); `rewards.process_reward_model` and `rerank` read it back.

`prm.train_on_last_step_only` (TRL's option) keeps only each train row's last label: an outcome
reward model on the same solutions (the held-out rows keep every label).
`prm.task=arithmetic` (no `data.path`) writes column-addition solutions with planted errors
(`tasks.arithmetic.prm_rows`) into WORKDIR/prm_data and, without `model.hf_path`, trains a
small tokenizer on them into WORKDIR/tokenizer.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ftjax import checkpoint, heads, partition
from ftjax import workdir as wd
from ftjax.data import prm as prm_data
from ftjax.errors import UserError
from ftjax.train import common, loop, setup

IGNORE = prm_data.IGNORE
COUNTS = ("accuracy", "bad_tp", "bad_fp", "bad_fn")  # summed per labelled step


def step_logits(model, params, batch: dict, rng=None) -> jax.Array:
  """float32 [B, T, 2]: the head's logits at every position of `batch["tokens"]`."""
  hidden = model.apply({"params": params}, batch["tokens"], mask=batch["mask"],
                       return_hidden=True, rngs=None if rng is None else {"dropout": rng})
  return heads.token_logits(params, hidden, model.cfg)


def prm_loss_fn(params, batch, rng, *, model):
  """Summed cross-entropy over the labelled positions; (sum, count, aux sums of COUNTS)."""
  logits = step_logits(model, params, batch, rng)
  labels = batch["labels"]
  valid = labels != IGNORE
  target = jnp.where(valid, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
  pred = jnp.argmax(logits, -1)
  f = lambda x: (x & valid).sum().astype(jnp.float32)
  aux = {"accuracy": f(pred == target), "bad_tp": f((pred == 0) & (target == 0)),
         "bad_fp": f((pred == 0) & (target == 1)), "bad_fn": f((pred == 1) & (target == 0))}
  return jnp.where(valid, ce, 0.0).sum(), valid.sum().astype(jnp.float32), aux


def with_f1(m: dict, prefix: str = "") -> dict:
  """Adds `bad_precision`, `bad_recall`, `bad_f1` from the bad-step counts (any common scale:
  sums, or per-step means as loop.evaluate gives)."""
  tp, fp, fn = (float(m[f"{prefix}bad_{k}"]) for k in ("tp", "fp", "fn"))
  out = dict(m)
  out[f"{prefix}bad_precision"] = tp / (tp + fp) if tp + fp else 0.0
  out[f"{prefix}bad_recall"] = tp / (tp + fn) if tp + fn else 0.0
  out[f"{prefix}bad_f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
  return out


def make_step(model, tx, schedule, grad_accum=1, axis_name=None):
  return functools.partial(common.update_step, loss_fn=functools.partial(prm_loss_fn, model=model),
                           tx=tx, schedule=schedule, grad_accum=grad_accum, axis_name=axis_name)


def check_config(config):
  p = config.prm
  if config.model.head != "token":
    raise UserError("config.model.head must be 'token' for a process reward model")
  if p.task not in ("", "arithmetic"):
    raise UserError(f"config.prm.task={p.task!r}: expected arithmetic (or '' and "
                    "config.data.path=FILE)")
  if not p.task and not (config.data.path or config.data.sources):
    raise UserError("config.data.path is required (rows: prompt, completions, labels), or "
                    "config.prm.task=arithmetic")


def prepare_task(config, workdir: str):
  """`prm.task=arithmetic`: sets data.path / eval_path (and model.tokenizer without
  model.hf_path) to files under `workdir` before the resume check compares configs; returns
  what writes them (after the check), or None."""
  p = config.prm
  if p.task != "arithmetic" or config.data.path:
    return None
  from ftjax import tokenizer as tokenizer_lib
  from ftjax.tasks import arithmetic
  d = os.path.join(workdir, "prm_data")
  config.data.path, config.data.eval_path = (os.path.join(d, f"{s}.jsonl")
                                             for s in ("train", "eval"))
  tok = None
  if not config.model.hf_path and not config.model.tokenizer:
    tok = config.model.tokenizer = os.path.join(workdir, "tokenizer")
  seed, n_train, n_eval = int(config.train.seed), int(p.train_rows), int(p.eval_rows)
  kinds = tuple(k for k in str(p.error_kinds).split(",") if k)
  bad = [k for k in kinds if k not in arithmetic.ERROR_KINDS]
  if bad or not kinds:
    raise UserError(f"config.prm.error_kinds={p.error_kinds!r}: expected a comma list of "
                    f"{', '.join(arithmetic.ERROR_KINDS)}")

  def build():
    os.makedirs(d, exist_ok=True)
    splits = {"train": n_train, "eval": n_eval}
    for split, n in splits.items():
      path = os.path.join(d, f"{split}.jsonl")
      if not os.path.exists(path):
        rows = arithmetic.prm_rows(split, n, seed, int(p.max_operand),
                                   float(p.error_fraction), kinds)
        with open(path + ".tmp", "w") as f:
          f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
    if tok and not os.path.exists(os.path.join(tok, "tokenizer.json")):
      tokenizer_lib.train_bpe_tokenizer(arithmetic.prm_texts(), 300, tok)
  return build


def last_step_only(examples: Sequence[dict]) -> list[dict]:
  """TRL's train_on_last_step_only: each row keeps only its last labelled position."""
  out = []
  for ex in examples:
    labels = np.full_like(ex["labels"], IGNORE)
    last = np.flatnonzero(ex["labels"] != IGNORE)[-1]
    labels[last] = ex["labels"][last]
    out.append({**ex, "labels": labels})
  return out


@wd.exclusive  # one run per workdir; a file or read-only disk is refused first
def run(config, workdir: str) -> dict:
  """Train; returns the last logged metrics (and eval metrics) as floats."""
  # ---- setup: config, model and data are checked before anything is written
  common.validate(config)
  check_config(config)
  t = config.train
  build_task = prepare_task(config, workdir)
  drift = wd.check_resume(config, workdir)  # a resume with a changed config is refused
  par = setup.parallel(config)
  par.check_batch(int(t.batch_size))
  if build_task:
    build_task()
  model, params, tok, base_ref = setup.build_model(config, par=par)
  state, frozen, schedule, tx, _ = loop.init(config, par, params, setup.rules(config))
  del params
  last_only = bool(config.prm.train_on_last_step_only)

  def build(data_config, tokenizer, seq_len, batch_size, **kw):
    data = prm_data.build_prm_dataset(data_config, tokenizer, seq_len, batch_size, **kw)
    if last_only:
      data.train.examples = last_step_only(data.train.examples)
    return data
  build_data = loop.data_builder(build, config, tok, workdir)

  # ---- restore (a fresh run reads its data first, so a bad file leaves no workdir)
  ckpt, state, data, start = loop.restore(workdir, t, state, base_ref, build_data,
                                          begin=lambda: wd.start_run(config, workdir, drift))
  logging.info("PRM data: %s", data.stats)
  eval_batches = loop.eval_batches(data, t)
  step_fn = par.compile(lambda axis: make_step(model, tx, schedule, int(t.grad_accum),
                                               axis_name=axis), state, frozen, schedule)
  eval_fn = loop.jit_eval(par, lambda tr, frz, b: prm_loss_fn(
      partition.merge(tr, frz), b, None, model=model), frozen)
  state, frozen = par.state(state), par.frozen(frozen)
  writer, bar = loop.open_logs(workdir, t.steps, start)
  extra = {"base": base_ref}
  last = {}

  def save(step, eval_metrics=None):
    ckpt.save(step, par.host_state(state), data.train.state, eval_metrics, extra)

  def run_eval():
    return with_f1(loop.evaluate(eval_fn, par.host_state(state)["params"], eval_batches,
                                 rates=("accuracy",)), "eval_")

  # ---- loop
  with loop.closing(ckpt, bar, writer):
    with checkpoint.PreemptionHandler() as preempt:
      step = start
      while step < t.steps:
        state, m = step_fn(state, frozen, par.batch(next(data.train)))
        step += 1
        if loop.due(step, t.log_every, t.steps):
          m = {k: float(v) for k, v in jax.device_get(par.metrics(m)).items()}
          m["accuracy"] = m["accuracy"] / max(m["target_tokens"], 1.0)
          last = loop.log(step, with_f1(m), writer, bar, hint="lower optim.lr")
        eval_metrics = loop.eval_and_save(step, t, eval_batches, run_eval, writer, save)
        last = {**last, **(eval_metrics or {})}
        if loop.stop_requested(preempt, step):
          break
    # ---- final save
    save(step)
    ckpt.wait()
  return loop.finish(preempt, step, workdir, last)


# ---------------------------------------------------------------------------- using a PRM


class StepScorer:
  """P(good step) of each step of solutions, from a trained PRM: an experiments/prm.py workdir
  (latest checkpoint) or an HF *ForTokenClassification export (with its tokenizer). Rows are
  tokenized as in training (`data.prm.tokenize_prm`) and scored at each step's separator."""

  def __init__(self, path: str, separator: str = "\n", batch_size: int = 32,
               max_len: int = 1024):
    from ftjax import hf
    from ftjax.tokenizer import load_tokenizer
    if os.path.isdir(os.path.join(path, "checkpoints")):
      self.model, self.params, self.tok, config = wd.load_trained(path)
      separator = config.data.get("step_separator", separator)
    elif os.path.isfile(os.path.join(path, "config.json")):
      self.tok = load_tokenizer(path)
      self.model, self.params = hf.load_pretrained(path)
    else:
      raise UserError(f"process reward model {path!r}: neither an experiments/prm.py workdir "
                      "nor an HF model directory")
    if self.model.cfg.head != "token":
      raise UserError(f"process reward model {path}: not a step classifier "
                      f"(head={self.model.cfg.head!r})")
    self.separator, self.batch_size, self.max_len = separator, int(batch_size), int(max_len)
    self._fn = jax.jit(lambda params, b: heads.step_scores(
        params, self.model.apply({"params": params}, b["tokens"], mask=b["mask"],
                                 return_hidden=True), self.model.cfg))

  def __call__(self, prompts: Sequence[str], solutions: Sequence[Sequence[str]]) -> list:
    """Per solution (a list of steps), the list of its steps' P(good); a step cut off by
    max_len gets none."""
    from ftjax import sampling
    rows = [prm_data.tokenize_prm({"prompt": p, "completions": list(s) or [""],
                                   "labels": [True] * max(len(s), 1)}, self.tok, self.separator)
            for p, s in zip(prompts, solutions)]
    rows = [{k: v[:self.max_len] for k, v in r.items()} for r in rows]
    out = []
    for s in range(0, len(rows), self.batch_size):
      chunk = rows[s:s + self.batch_size]
      t = sampling.bucket_length(max(len(r["input_ids"]) for r in chunk))
      batch = prm_data.make_batch(chunk, list(range(len(chunk))) + [None] * (
          self.batch_size - len(chunk)), t, 0)
      batch["mask"][len(chunk):, 0] = True  # filler rows: one valid token, ignored
      scores = np.asarray(self._fn(self.params, {k: batch[k] for k in ("tokens", "mask")}))
      for i in range(len(chunk)):
        out.append(scores[i][batch["labels"][i] != IGNORE].tolist())
    return out


AGGREGATIONS = ("min", "last", "prod")


def aggregate(step_scores: Sequence[float], how: str = "min") -> Optional[float]:
  """One solution's score from its steps': the weakest step (`min`), the last step (`last`) or
  the product (`prod`, Lightman et al.'s P(every step good)); None without steps."""
  if how not in AGGREGATIONS:
    raise UserError(f"step score aggregation {how!r}: expected one of {', '.join(AGGREGATIONS)}")
  if not len(step_scores):
    return None
  if how == "min":
    return float(min(step_scores))
  if how == "last":
    return float(step_scores[-1])
  return float(np.prod(step_scores))


def rerank(scorer: StepScorer, prompt: str, candidates: Sequence[Sequence[str]],
           how: str = "min") -> tuple[int, list]:
  """Best-of-N: (index of the best candidate solution, every candidate's score) under the PRM
  `scorer` with aggregation `how`. Ties go to the first; an unscorable candidate ranks last."""
  steps = scorer([prompt] * len(candidates), candidates)
  scores = [aggregate(s, how) for s in steps]
  keyed = [-np.inf if s is None else s for s in scores]
  return int(np.argmax(keyed)), scores
