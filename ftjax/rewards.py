"""Reward functions for online RL, with TRL's signature, and their weighted sum.

A reward is any callable `fn(prompts, completions, **columns) -> list[float | None]`, one value
per completion (TRL's GRPOTrainer contract): `prompts` and `completions` are strings, or for
chat prompts message lists (the completion as `[{"role": "assistant", "content": text}]`, as
TRL passes it); `columns` are the dataset's other columns, one value per completion (each
prompt's row repeated G times), plus `completion_ids` (token lists). None means "does not
apply here" and is skipped in the weighted sum; a completion every reward skips is unscorable
(its total is NaN, its advantage 0), as TRL's `_calculate_rewards` + nansum.

Built-ins (factories returning such callables):
  answer_match(column)          1 if the completion's number equals the answer column's
                                (`#### 42`, then `\\boxed{42}`, then the last number)
  format_match(pattern)         1 if the regex matches the completion (re.search, DOTALL)
  soft_overlong_punishment(...) TRL's length penalty (`trl.rewards.get_soft_overlong_punishment`)
  reward_model(path)            a trained ftjax reward model (workdir) or an HF
                                *ForSequenceClassification export, scoring prompt + completion
  process_reward(path[:min|last|prod])  a process reward model (experiments/prm.py workdir or
                                its *ForTokenClassification export): the completion's steps'
                                P(good), the weakest (min, the default) or the last step's
A task's own rewards (the support demo's `support_scorer`) live with the task (ftjax/tasks/) and
reach `from_spec` as `named`.
"""

from __future__ import annotations

import inspect

import math
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ftjax.errors import UserError

RewardFn = Callable[..., list]


def name_of(fn: RewardFn) -> str:
  return getattr(fn, "__name__", None) or type(fn).__name__


def text_of(x: Any) -> str:
  """A completion (or prompt) as text: strings as they are, message lists joined by content."""
  if isinstance(x, str):
    return x
  if isinstance(x, (list, tuple)):
    return "".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in x)
  return str(x)


def score(reward_fns: Sequence[RewardFn], weights: Optional[Sequence[float]], prompts: list,
          completions: list, columns: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Calls every reward and sums them with weights, skipping None.

  Args:
    prompts, completions: N each (prompts repeated per sample).
    columns: name -> list of N values (dataset columns, `completion_ids`, ...).
  Returns:
    (total float32 [N] (NaN where every reward gave None), per_fn float32 [N, F] (NaN for None),
     names [F]).
  Raises:
    UserError naming the reward when it raises, returns the wrong length or a non-number.
  """
  n = len(completions)
  weights = [1.0] * len(reward_fns) if weights is None or not len(weights) else list(weights)
  if len(weights) != len(reward_fns):
    raise UserError(f"{len(weights)} reward weights for {len(reward_fns)} reward functions")
  names = [name_of(f) for f in reward_fns]
  per_fn = np.full((n, len(reward_fns)), np.nan, np.float32)
  for j, (fn, name) in enumerate(zip(reward_fns, names)):
    try:
      out = fn(prompts=prompts, completions=completions, **columns)
    except UserError:
      raise
    except Exception as e:  # the user's reward code: one line naming it
      msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise UserError(f"reward function {name!r} raised {type(e).__name__}: {msg}") from e
    try:
      out = list(out)
    except TypeError:
      raise UserError(f"reward function {name!r} returned {type(out).__name__}, expected a list "
                      f"of {n} floats") from None
    if len(out) != n:
      raise UserError(f"reward function {name!r} returned {len(out)} rewards for {n} "
                      "completions (one per completion expected)")
    for i, r in enumerate(out):
      if r is None:
        continue
      try:
        per_fn[i, j] = float(r)
      except (TypeError, ValueError):
        raise UserError(f"reward function {name!r} returned {r!r} at completion {i}, expected a "
                        "float or None") from None
  w = np.asarray(weights, np.float32)[None, :]
  total = np.nansum(per_fn * w, axis=1).astype(np.float32)
  total[np.isnan(per_fn).all(axis=1)] = np.nan  # unscorable, as TRL
  return total, per_fn, names


# ------------------------------------------------------------------------------------------------
# Verifiable answers

_NUM = r"-?\d[\d,]*(?:\.\d+)?"


def extract_number(text: str) -> Optional[float]:
  """The answer of a solution text: after `####` (GSM8K), else in `\\boxed{}`, else the last
  number; commas are thousands separators. None when there is no number."""
  text = text_of(text)
  for rx in (r"####\s*\$?\s*(" + _NUM + ")", r"\\boxed\{\s*\$?\s*(" + _NUM + r")\s*\}"):
    m = re.findall(rx, text)
    if m:
      return _to_float(m[-1])
  m = re.findall(_NUM, text)
  return _to_float(m[-1]) if m else None


def _to_float(s: str) -> Optional[float]:
  try:
    return float(s.replace(",", ""))
  except ValueError:
    return None


class answer_match:  # noqa: N801 (a factory, named like a function as TRL's rewards)
  """1.0 when the completion's number equals the `column` answer's, else 0.0; None for a row
  without an answer. A class rather than a closure so it pickles (as TRL's built-ins)."""

  def __init__(self, column: str = "answer", tol: float = 1e-6):
    self.column, self.tol = column, tol
    self.__name__ = "answer_match"

  def __call__(self, prompts, completions, **columns) -> list:
    if self.column not in columns:
      raise UserError(f"reward {self.__name__}: the dataset has no {self.column!r} column "
                      f"(columns: {', '.join(sorted(columns)) or 'none'})")
    out = []
    for c, a in zip(completions, columns[self.column]):
      want = a if isinstance(a, (int, float)) else (
          None if a is None else extract_number(str(a)))
      if want is None or (isinstance(want, float) and math.isnan(want)):
        out.append(None)
        continue
      got = extract_number(text_of(c))
      out.append(float(got is not None and abs(got - float(want)) <= self.tol))
    return out


class format_match:  # noqa: N801
  """1.0 when `pattern` matches the completion text (re.search with DOTALL), else 0.0."""

  def __init__(self, pattern: str = r"^<think>(?!.*<think>)(.*?)</think>.*$"):
    try:
      self.rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
      raise UserError(f"format reward: bad regex {pattern!r}: {e}") from None
    self.__name__ = "format_match"

  def __call__(self, prompts, completions, **columns) -> list:
    return [float(self.rx.search(text_of(c)) is not None) for c in completions]


class soft_overlong_punishment:  # noqa: N801
  """DAPO's length penalty, as `trl.rewards.get_soft_overlong_punishment`: 0 up to
  max_len - cache tokens, then linear down to -1 at max_len, -1 beyond."""

  def __init__(self, max_completion_len: int, soft_punish_cache: int):
    if not 0 < soft_punish_cache <= max_completion_len:
      raise UserError(f"length reward: need 0 < soft_punish_cache={soft_punish_cache} <= "
                      f"max_completion_len={max_completion_len}")
    self.max_len, self.cache = int(max_completion_len), int(soft_punish_cache)
    self.__name__ = "soft_overlong_punishment"

  def __call__(self, prompts=None, completions=None, completion_ids=None, **columns) -> list:
    if completion_ids is None:
      raise UserError("reward soft_overlong_punishment needs completion_ids")
    out = []
    for ids in completion_ids:
      n = len(ids)
      if n <= self.max_len - self.cache:
        out.append(0.0)
      elif n <= self.max_len:
        out.append((self.max_len - self.cache - n) / self.cache)
      else:
        out.append(-1.0)
    return out


# ------------------------------------------------------------------------------------------------
# Learned scorers


class reward_model:  # noqa: N801
  """A reward model's score of prompt + completion: an ftjax reward-model workdir (latest
  checkpoint) or an HF *ForSequenceClassification directory. Chat prompts go through the
  tokenizer's chat template, as TRL does for model rewards; batches are right-padded to a
  bucketed length, scored at the last real token (HF's rule, `heads.sequence_score`)."""

  def __init__(self, path: str, batch_size: int = 16, max_len: int = 1024):
    import os
    from ftjax import hf, workdir as wd
    from ftjax.tokenizer import load_tokenizer
    if os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(
        os.path.join(path, "checkpoints")):
      self.model, self.params, self.tok, _ = wd.load_trained(path)
    else:
      self.tok = load_tokenizer(path)
      extra = {}
      if self.tok.pad_token_id is not None:
        extra["pad_token_id"] = self.tok.pad_token_id
      self.model, self.params = hf.load_pretrained(path, head="score", **extra)
    if self.model.cfg.head != "score":
      raise UserError(f"reward model {path}: not a reward model (head={self.model.cfg.head!r})")
    self.batch_size, self.max_len = int(batch_size), int(max_len)
    self.__name__ = f"reward_model({os.path.basename(os.path.normpath(path))})"
    self._fn = None

  def _texts(self, prompts, completions) -> list[list[int]]:
    ids = []
    for p, c in zip(prompts, completions):
      if isinstance(p, (list, tuple)):
        msgs = list(p) + (list(c) if isinstance(c, (list, tuple)) else
                          [{"role": "assistant", "content": text_of(c)}])
        text = self.tok.apply_chat_template(msgs, tokenize=False)
      else:
        text = p + text_of(c)
      ids.append(self.tok(text, add_special_tokens=False)["input_ids"][-self.max_len:])
    return ids

  def __call__(self, prompts, completions, **columns) -> list:
    import jax
    from ftjax import heads, sampling
    if self._fn is None:
      def fn(params, tokens, mask):
        hidden = self.model.apply({"params": params}, tokens, mask=mask, return_hidden=True)
        return heads.sequence_score(params, hidden, tokens, mask, self.model.cfg)
      self._fn = jax.jit(fn)
    ids = self._texts(prompts, completions)
    pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
    out = []
    for s in range(0, len(ids), self.batch_size):
      chunk = ids[s:s + self.batch_size]
      t = sampling.bucket_length(max(len(x) for x in chunk))
      tokens = np.full((self.batch_size, t), pad, np.int32)
      mask = np.zeros((self.batch_size, t), bool)
      for i, x in enumerate(chunk):
        tokens[i, :len(x)], mask[i, :len(x)] = x, True
      mask[len(chunk):, 0] = True  # filler rows: one valid token, ignored
      out.extend(np.asarray(self._fn(self.params, tokens, mask))[:len(chunk)].tolist())
    return [float(r) for r in out]


class process_reward:  # noqa: N801
  """A process reward model's score of a completion's steps (the completion split at the PRM's
  step separator, "\n" by default; empty steps dropped): the weakest step's P(good) (`min`) or
  the last step's (`last`); `prod` multiplies them. From an experiments/prm.py workdir or its
  HF *ForTokenClassification export (`ftjax.train.prm.StepScorer`). A completion without a
  step gets None (no score)."""

  def __init__(self, spec: str, batch_size: int = 32):
    import os
    from ftjax.train import prm
    path, _, how = spec.rpartition(":")
    if how not in prm.AGGREGATIONS:  # no aggregation given: the path holds every colon
      path, how = spec, "min"
    prm.aggregate([], how)  # an unknown aggregation is refused here, before any rollout
    self.scorer = prm.StepScorer(path, batch_size=batch_size)
    self.how = how
    self.__name__ = f"process_reward({os.path.basename(os.path.normpath(path))}:{how})"

  def __call__(self, prompts, completions, **columns) -> list:
    from ftjax.train import prm
    sep = self.scorer.separator
    steps = [[s for s in text_of(c).split(sep) if s.strip()] for c in completions]
    keep = [i for i, s in enumerate(steps) if s]
    scored = self.scorer([text_of(prompts[i]) for i in keep], [steps[i] for i in keep])
    out: list = [None] * len(completions)
    for i, s in zip(keep, scored):
      out[i] = prm.aggregate(s, self.how)
    return out


BUILTINS = {"answer_match": answer_match, "format_match": format_match,
            "soft_overlong_punishment": soft_overlong_punishment, "reward_model": reward_model,
            "process_reward": process_reward}


def from_spec(spec: str, named: Optional[dict] = None) -> RewardFn:
  """A reward from a config string `name[:arg[:arg]]`, e.g. `answer_match:answer`,
  `format_match:^\\d+$`, `soft_overlong_punishment:64:16`, `reward_model:/path`: a built-in
  or one of `named` (the tasks' rewards, `ftjax.tasks.named_rewards()`)."""
  name, _, rest = spec.partition(":")
  known = {**BUILTINS, **(named or {})}
  if name not in known:
    raise UserError(f"config.grpo.rewards: unknown reward {name!r}; built-ins: "
                    f"{', '.join(known)}")
  if name == "soft_overlong_punishment":
    a, _, b = rest.partition(":")
    try:
      return soft_overlong_punishment(int(a), int(b))
    except ValueError:
      raise UserError(f"config.grpo.rewards: {spec!r}: expected "
                      "soft_overlong_punishment:MAX_LEN:CACHE") from None
  if not rest:
    return known[name]()
  try:
    inspect.signature(known[name]).bind(rest)
  except TypeError:  # a reward that takes no argument, given one
    raise UserError(f"config.grpo.rewards: {spec!r}: {name} takes no argument (use {name!r})"
                    ) from None
  return known[name](rest)
