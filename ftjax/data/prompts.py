"""Prompt datasets for online RL: TRL's layout, a resumable iterator, the arithmetic task.

A row has a `prompt` column, a string or a list of chat messages (TRL's "prompt-only"
layout); every other column is handed to the reward functions (`answer`, `meta`, ...).
`PromptIterator` yields fixed-size lists of rows in a seeded order reshuffled every epoch; its
position (`state`) goes in the checkpoint so a resumed run sees exactly the same prompts.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ftjax.data import sources
from ftjax.errors import UserError


def check_rows(rows: Sequence[dict], where: str,
               row_numbers: Optional[Sequence[int]] = None) -> list[dict]:
  """The rows as dicts, each with a non-empty `prompt`; else a one-line error naming the row
  (1-based, as every data error counts them; `row_numbers` when the rows are a selection)."""
  out = []
  for i, r in enumerate(rows):
    p = r.get("prompt") if isinstance(r, dict) else None
    bad = (p is None or (isinstance(p, str) and not p.strip())
           or (isinstance(p, list) and not any(isinstance(m, dict) and m.get("content")
                                               for m in p))
           or not isinstance(p, (str, list)))
    if bad:
      row = row_numbers[i] if row_numbers is not None else i + 1
      raise UserError(f"{where}: row {row}: field 'prompt' is "
                      f"{'missing' if p is None else 'empty or not a string/messages'}")
    out.append(dict(r))
  if not out:
    raise UserError(f"{where}: no prompts")
  return out


def load_rows(source, where: Optional[str] = None) -> list[dict]:
  """Rows of a local JSONL/JSON/parquet file or a hub dataset (`data.sources` entry)."""
  records = sources.load_records(source)
  return check_rows([sources.to_python(r) for r in records], where or sources.describe(source),
                    [records.row(i) for i in range(len(records))])


GSM8K_INSTRUCTION = ("Solve the problem step by step, then give the final answer as a number "
                     "on the last line after '####'.")


def gsm8k_rows(source, where: Optional[str] = None) -> list[dict]:
  """GSM8K's layout (`question`, `answer` ending in `#### 42`) as prompt rows: the question
  (and the instruction) as one chat user turn, so the model's chat template applies; `answer`
  stays a column, which `rewards.answer_match` reads after its `####`."""
  where = where or sources.describe(source)
  rows = []
  records = sources.load_records(source)
  for i, r in enumerate(records):
    r = sources.to_python(r)
    for field in ("question", "answer"):
      if not isinstance(r.get(field), str) or not r[field].strip():
        raise UserError(f"{where}: row {records.row(i)}: field {field!r} is missing or empty "
                        "(GSM8K layout: question, answer)")
    rows.append({"prompt": [{"role": "user",
                             "content": f"{r['question'].strip()}\n\n{GSM8K_INSTRUCTION}"}],
                 "answer": r["answer"]})
  return check_rows(rows, where)


def encode(tokenizer, prompt, max_len: int = 0) -> list[int]:
  """Prompt token ids: chat messages through the chat template with the generation prompt
  opened (as TRL), strings as they are."""
  if isinstance(prompt, list):
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  else:
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    # As ftjax's SFT formats lay a prompt out ([bos] + prompt + completion): a tokenizer that
    # adds no BOS itself would otherwise show the SFT model prompts it never saw.
    if isinstance(bos, int) and (not ids or ids[0] != bos):
      ids = [bos] + ids
  return ids[-max_len:] if max_len else ids


class PromptIterator:
  """`next()` -> `batch` rows; order from `seed`, reshuffled per epoch; `state` resumes it."""

  def __init__(self, rows: Sequence[dict], batch: int, seed: int, state: Optional[dict] = None):
    self.rows, self.batch, self.seed = list(rows), int(batch), int(seed)
    state = state or {}
    self.epoch, self.pos = int(state.get("epoch", 0)), int(state.get("pos", 0))

  @property
  def state(self) -> dict:
    return {"epoch": self.epoch, "pos": self.pos}

  def _order(self, epoch):
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

  def next(self) -> list[dict]:
    out = []
    while len(out) < self.batch:
      order = self._order(self.epoch)
      take = order[self.pos:self.pos + self.batch - len(out)]
      out.extend(self.rows[i] for i in take)
      self.pos += len(take)
      if self.pos >= len(self.rows):
        self.epoch, self.pos = self.epoch + 1, 0
    return out


# ------------------------------------------------------------------------------------------------
# Arithmetic: a verifiable task small enough to learn on CPU.

def arithmetic_prompt(a: int, b: int) -> str:
  return f"{a}+{b}="


def held_out_pairs(max_operand: int = 99, fraction: float = 0.2) -> np.ndarray:
  """bool [max_operand + 1, max_operand + 1]: the operand pairs (a, b) kept for evaluation.

  A fixed draw, independent of the run's seed, so the splits never overlap whatever the seed.
  Every digit appears in every position on both sides: the eval split tests adding numbers the
  model has not been shown together, not reading a digit it has never seen.
  """
  return np.random.default_rng(7).random((max_operand + 1, max_operand + 1)) < fraction


def sum_without_carries(a: int, b: int) -> int:
  """a + b added digit by digit with every carry dropped (37 + 48 -> 75): a sloppy solver's
  answer, right whenever no column carries."""
  out, place = 0, 1
  while a or b:
    out += (a % 10 + b % 10) % 10 * place
    a, b, place = a // 10, b // 10, place * 10
  return out


def arithmetic_rows(split: str, n: int, seed: int = 0, max_operand: int = 99,
                    carry_drop: float = 0.0) -> list[dict]:
  """Addition problems `{"prompt": "12+34=", "answer": "46"}`.

  Operand pairs in `held_out_pairs` appear only in the "eval" split (held-out operands);
  "train" never contains them. `carry_drop`: the fraction of rows whose answer is
  `sum_without_carries` instead (solutions from a sloppy teacher; only rows with a carry
  change). The problems drawn do not depend on it.
  """
  held_out = held_out_pairs(max_operand)
  rng = np.random.default_rng([seed, 0 if split == "train" else 1])
  sloppy = np.random.default_rng([seed, 2]).random(n) < carry_drop
  rows = []
  while len(rows) < n:
    a, b = (int(x) for x in rng.integers(0, max_operand + 1, 2))
    if held_out[a, b] == (split == "eval"):
      answer = sum_without_carries(a, b) if sloppy[len(rows)] else a + b
      rows.append({"prompt": arithmetic_prompt(a, b), "answer": str(answer)})
  return rows


def arithmetic_texts(n: int = 2000, seed: int = 0) -> list[str]:
  """Solved problems, e.g. to train a tokenizer or an SFT warm start."""
  return [r["prompt"] + r["answer"] for r in arithmetic_rows("train", n, seed)]
