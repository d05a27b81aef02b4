"""Prompt datasets for online RL: TRL's layout and a resumable iterator (the built-in tasks'
rows are in ftjax/tasks/).

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


def encode(tokenizer, prompt, max_len: int = 0) -> list[int]:
  """Prompt token ids: chat messages through the chat template with the generation prompt
  opened (as TRL), strings as `tokenizer(prompt)` encodes them (its BOS only if it adds one)."""
  if isinstance(prompt, list):
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  else:
    # With the tokenizer's own special tokens, as TRL's GRPO tokenizes text prompts and as
    # ftjax's SFT formats start a plain-text sequence by default (`formats.bos_ids`).
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
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
