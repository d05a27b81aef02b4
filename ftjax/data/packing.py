"""Lay examples out in rows of seq_len: packed (several per row, with segment ids) or one per row.

An example of n tokens fills n - 1 positions of a row: inputs tokens[:-1], targets tokens[1:],
weights loss_mask[1:]. So every target lies in its own example's segment, and no weight is ever
set across a segment boundary or on padding. A batch is a dict of numpy arrays:

  inputs       int32   [B, T]  token ids, `pad_id` on padding
  targets      int32   [B, T]  the next token within the same segment, 0 on padding
  weights      float32 [B, T]  1 where targets[b, t] is a loss target, else 0
  segment_ids  int32   [B, T]  1, 2, ... per example in the row; 0 is padding
  positions    int32   [B, T]  position within its example (0, 1, ...); 0 on padding

Attention for packed rows must be causal within equal nonzero segment ids.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def example_length(example: dict) -> int:
  """Positions the example fills in a row: n tokens -> n - 1 (input, target) pairs."""
  return len(example["tokens"]) - 1


def pack_rows(lengths: Sequence[int], order: Sequence[int], seq_len: int,
              window: int = 16) -> list[list[int]]:
  """Greedy first-fit packing of examples, taken in `order`, into rows of capacity seq_len.

  Each example goes into the first of the (at most `window`) open rows it fits in, else opens a
  new row; when more than `window` rows are open the oldest is closed. Rows come out in the order
  they close. `window=1` is sequential (next-fit) packing. Deterministic in its inputs, and
  linear in the number of examples.

  Returns:
    rows: lists of example indices, each list's lengths summing to at most seq_len.
  """
  rows, open_rows = [], []  # open_rows: [space left, [ids]]
  for i in order:
    n = lengths[i]
    if n > seq_len or n < 1:
      raise ValueError(f"example {i} fills {n} positions; rows hold 1..{seq_len}")
    for slot in open_rows:
      if slot[0] >= n:
        break
    else:
      slot = [seq_len, []]
      open_rows.append(slot)
    slot[0] -= n
    slot[1].append(int(i))
    if slot[0] == 0:
      open_rows.remove(slot)
      rows.append(slot[1])
    elif len(open_rows) > window:
      rows.append(open_rows.pop(0)[1])
  rows.extend(slot[1] for slot in open_rows)
  return rows


def single_rows(order: Sequence[int]) -> list[list[int]]:
  """The non-packed layout: one example per row, right-padded."""
  return [[int(i)] for i in order]


def make_batch(examples: Sequence[dict], rows: Sequence[Sequence[int]], seq_len: int,
               pad_id: int = 0) -> dict[str, np.ndarray]:
  """Arrays for `rows` (lists of example indices; an empty list is an all-padding row)."""
  b = len(rows)
  batch = {
      "inputs": np.full((b, seq_len), pad_id, np.int32),  # [B, T]
      "targets": np.zeros((b, seq_len), np.int32),
      "weights": np.zeros((b, seq_len), np.float32),
      "segment_ids": np.zeros((b, seq_len), np.int32),
      "positions": np.zeros((b, seq_len), np.int32),
  }
  for r, row in enumerate(rows):
    start = 0
    for seg, i in enumerate(row, 1):
      tokens, mask = examples[i]["tokens"], examples[i]["loss_mask"]
      n = len(tokens) - 1
      if start + n > seq_len:
        raise ValueError(f"row {r} overflows seq_len={seq_len}")
      span = slice(start, start + n)
      batch["inputs"][r, span] = tokens[:-1]
      batch["targets"][r, span] = tokens[1:]
      batch["weights"][r, span] = mask[1:]
      batch["segment_ids"][r, span] = seg
      batch["positions"][r, span] = np.arange(n)
      start += n
  return batch


def efficiency(lengths: Sequence[int], rows: Sequence[Sequence[int]], seq_len: int) -> float:
  """Non-pad positions / all positions over `rows`."""
  if not rows:
    return 0.0
  used = sum(lengths[i] for row in rows for i in row)
  return used / (len(rows) * seq_len)
