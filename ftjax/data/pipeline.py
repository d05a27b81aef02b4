"""A deterministic, resumable iterator over batches of tokenized examples.

Epoch e visits the examples in the order `np.random.default_rng([seed, e]).permutation(n)`,
lays them out in rows (packed or one per row, see `packing`), and the rows of successive epochs
form one stream that batches cut into `batch_size` rows: a batch may straddle an epoch boundary,
and no row is dropped or padded. The position in that stream is the iterator's state,

  {"epoch": e, "row": r}    the next row is row r of epoch e's layout

a small JSON-able dict: `BatchIterator(..., state=saved)` yields exactly the batches that
followed when `saved = it.state` was read. Multi-host: with `process_count > 1` every process
builds the same global batch order and keeps rows [i * B / P, (i + 1) * B / P) of each batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ftjax.data import packing as pk
from ftjax.errors import UserError


class BatchIterator:
  """Infinite iterator of batch dicts (see `packing` for the arrays), with a resumable state."""

  def __init__(self, examples: Sequence[dict], batch_size: int, seq_len: int, *, seed: int = 0,
               packing: bool = True, pad_id: int = 0, pack_window: int = 16,
               state: dict | None = None, process_index: int = 0, process_count: int = 1):
    """Starts at `state`, or at epoch 0, row 0.

    Args:
      examples: `{"tokens": int32 [n], "loss_mask": bool [n]}` dicts, each with
        2 <= n <= seq_len + 1 (as `formats.tokenize_records` makes them).
      batch_size: global rows per batch (all processes together).
      state: a previous `iterator.state` to resume from; None starts at epoch 0, row 0.
      process_index, process_count: this process's share of each global batch.
    """
    if not examples:
      raise UserError("no training examples (check data.path / data.sources)")
    if batch_size % process_count:
      raise UserError(f"train.batch_size {batch_size} is not divisible by {process_count} "
                      "processes")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self.examples = examples
    self.lengths = [pk.example_length(e) for e in examples]
    bad = [i for i, n in enumerate(self.lengths) if not 1 <= n <= seq_len]
    if bad:
      raise ValueError(f"example {bad[0]} has {self.lengths[bad[0]] + 1} tokens; "
                       f"want 2..{seq_len + 1} (fit it with formats.fit)")
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
    self.packing, self.pad_id, self.pack_window = packing, pad_id, pack_window
    self.process_index, self.process_count = process_index, process_count
    state = state or {"epoch": 0, "row": 0}
    self._epoch, self._row = int(state["epoch"]), int(state["row"])
    self._layout_epoch, self._layout = None, None

  @property
  def state(self) -> dict:
    """Where the next batch starts: `{"epoch": int, "row": int}`."""
    return {"epoch": self._epoch, "row": self._row}

  def shard(self, process_index: int, process_count: int) -> BatchIterator:
    """The same stream and state, keeping this process's rows of every global batch."""
    return BatchIterator(self.examples, self.batch_size, self.seq_len, seed=self.seed,
                         packing=self.packing, pad_id=self.pad_id, pack_window=self.pack_window,
                         state=self.state, process_index=process_index,
                         process_count=process_count)

  def layout(self, epoch: int) -> list[list[int]]:
    """Epoch `epoch`'s rows (lists of example indices), in order."""
    if self._layout_epoch != epoch:
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
      if self.packing:
        self._layout = pk.pack_rows(self.lengths, order, self.seq_len, self.pack_window)
      else:
        self._layout = pk.single_rows(order)
      self._layout_epoch = epoch
    return self._layout

  def efficiency(self, epoch: int | None = None) -> float:
    """Packing efficiency of one epoch's layout (the current epoch by default)."""
    return pk.efficiency(self.lengths, self.layout(self._epoch if epoch is None else epoch),
                         self.seq_len)

  def __iter__(self):
    return self

  def next_rows(self) -> list[list[int]]:
    """This process's rows of the next global batch (lists of example indices); advances."""
    local = self.batch_size // self.process_count
    lo = self.process_index * local
    rows = []
    for k in range(self.batch_size):
      rows_e = self.layout(self._epoch)
      if lo <= k < lo + local:
        rows.append(rows_e[self._row])
      self._row += 1
      if self._row == len(rows_e):
        self._epoch, self._row = self._epoch + 1, 0
    return rows

  def __next__(self) -> dict[str, np.ndarray]:
    return pk.make_batch(self.examples, self.next_rows(), self.seq_len, self.pad_id)


def eval_batches(examples: Sequence[dict], batch_size: int, seq_len: int, *, packing: bool = False,
                 pad_id: int = 0, pack_window: int = 16, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """One pass over `examples` in order; the last batch is completed with all-padding rows."""
  if batch_size % process_count:
    raise UserError(f"train.batch_size {batch_size} is not divisible by {process_count} "
                      "processes")
  order = range(len(examples))
  lengths = [pk.example_length(e) for e in examples]
  rows = pk.pack_rows(lengths, order, seq_len, pack_window) if packing else pk.single_rows(order)
  local = batch_size // process_count
  out = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    chunk = chunk + [[] for _ in range(batch_size - len(chunk))]
    mine = chunk[process_index * local:(process_index + 1) * local]
    out.append(pk.make_batch(examples, mine, seq_len, pad_id))
  return out
