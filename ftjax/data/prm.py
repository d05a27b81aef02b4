"""Stepwise-supervision data for process reward models, in TRL's PRM layout (v0.19 PRMTrainer):

  {"prompt": "12+34=", "completions": ["2+4=6 carry 0", "1+3+0=4 carry 0"],
   "labels": [true, true]}

Each step is tokenized alone (no special tokens) and followed by the separator's tokens
(`data.step_separator`, "\\n" by default); the step's label (1 good, 0 bad) sits on the last
token of its separator and every other position is ignored (IGNORE, -100 as in transformers'
token classification). The prompt is tokenized alone too, after the tokenizer's BOS when it has
one, as TRL's `tokenize_row` does. A row longer than `seq_len` is cut from the right (TRL's
`max_length`); one left with no labelled step is dropped.

Batches ([B, T], one row per example, right-padded):

  tokens  int32  the row's token ids (pad id after its end)
  mask    bool   True on the row's tokens
  labels  int32  1 / 0 on each step's separator token, IGNORE elsewhere

A row that is not an object, a prompt that is not a string, completions that are not a
non-empty list of strings, labels that are not booleans or a different number of labels than
completions raise a one-line `DataError` naming the file, row and field (or are skipped with
`data.skip_malformed`).
"""

from __future__ import annotations

import dataclasses
from itertools import chain
from typing import Any, Mapping, Sequence

import numpy as np

from ftjax.data.formats import DataStats, _RowError, collect_sources, each_record
from ftjax.data.pipeline import BatchIterator
from ftjax.data.sources import DataError, Records, cfg_get, load_records

IGNORE = -100  # transformers' ignore index: a position that carries no label


def _is_bool(v) -> bool:
  return isinstance(v, (bool, np.bool_))


def check_row(record: Any, fields: Mapping[str, str] | None = None) -> tuple[str, list, list]:
  """(prompt, completions, labels) of a PRM row; raises `_RowError` naming the bad field."""
  fields = dict(fields or {})
  pk, ck, lk = (fields.get(k, k) for k in ("prompt", "completions", "labels"))
  if not isinstance(record, Mapping):
    raise _RowError("*", f"row should be an object, got {type(record).__name__}")
  prompt, steps, labels = record.get(pk), record.get(ck), record.get(lk)
  if prompt is None:
    raise _RowError(pk, "is missing")
  if not isinstance(prompt, str):
    raise _RowError(pk, f"should be a string, got {type(prompt).__name__}")
  if steps is None:
    raise _RowError(ck, "is missing (PRM rows hold prompt, completions: a list of steps, "
                    "labels: a list of true/false)")
  if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
    raise _RowError(ck, "should be a non-empty list of strings (the steps)")
  if labels is None:
    raise _RowError(lk, "is missing")
  if not isinstance(labels, list) or not all(_is_bool(v) for v in labels):
    raise _RowError(lk, f"should be a list of true/false, got {labels!r:.60}")
  if len(labels) != len(steps):
    raise _RowError(lk, f"has {len(labels)} labels for {len(steps)} completions (one per step)")
  return prompt, steps, labels


def tokenize_prm(record: Mapping, tokenizer, separator: str = "\n", *,
                 fields: Mapping[str, str] | None = None) -> dict:
  """One PRM row -> {"input_ids": int32 [n], "labels": int32 [n]} (labels IGNORE except on each
  step's separator token). Raises DataError naming the field."""
  try:
    prompt, steps, labels = check_row(record, fields)
  except _RowError as e:
    raise DataError(str(e)) from None
  ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
  sep = tokenizer.encode(separator, add_special_tokens=False)
  if not sep:
    raise DataError(f"data.step_separator={separator!r} has no tokens")
  prompt_ids = ids(prompt)
  if tokenizer.bos_token_id is not None:
    prompt_ids = [tokenizer.bos_token_id] + prompt_ids
  step_ids = [ids(s) + sep for s in steps]
  step_labels = [[IGNORE] * (len(s) - 1) + [int(v)] for s, v in zip(step_ids, labels)]
  return {"input_ids": np.asarray(prompt_ids + list(chain(*step_ids)), np.int32),
          "labels": np.asarray([IGNORE] * len(prompt_ids) + list(chain(*step_labels)), np.int32)}


def tokenize_prm_records(records, tokenizer, seq_len: int, *, separator: str = "\n",
                         fields=None, skip_malformed: bool = False) -> tuple[list[dict], DataStats]:
  """Records -> PRM examples of at most seq_len tokens (cut from the right), with stats."""
  if not isinstance(records, Records):
    records = Records("<records>", records)
  stats, out = DataStats(), []
  made = each_record(records, lambda r: tokenize_prm(r, tokenizer, separator, fields=fields),
                     skip_malformed, stats)
  for ex in made:
    if len(ex["input_ids"]) > seq_len:
      ex = {k: v[:seq_len] for k, v in ex.items()}
      stats.truncated += 1
    if not (ex["labels"] != IGNORE).any():
      stats.dropped += 1
      continue
    out.append(ex)
  stats.examples = len(out)
  stats.tokens = int(sum(len(e["input_ids"]) for e in out))
  stats.target_tokens = int(sum((e["labels"] != IGNORE).sum() for e in out))
  return out, stats


def make_batch(examples: Sequence[dict], rows: Sequence[int | None], seq_len: int,
               pad_id: int = 0) -> dict[str, np.ndarray]:
  """Right-padded [len(rows), seq_len] arrays; a None row is all padding (no labels)."""
  b = len(rows)
  tokens = np.full((b, seq_len), pad_id, np.int32)
  mask = np.zeros((b, seq_len), bool)
  labels = np.full((b, seq_len), IGNORE, np.int32)
  for i, r in enumerate(rows):
    if r is None:
      continue
    ex = examples[r]
    n = len(ex["input_ids"])
    tokens[i, :n], mask[i, :n], labels[i, :n] = ex["input_ids"], True, ex["labels"]
  return {"tokens": tokens, "mask": mask, "labels": labels}


_TWO_TOKENS = np.zeros(2, np.int32)  # a placeholder example: 2 tokens, 1 position


class PRMIterator:
  """Infinite shuffled batches (a new order per epoch, from `seed`), with a resumable state.

  The order, epochs, state `{"epoch", "row"}` and process sharding are `pipeline.BatchIterator`'s
  without packing, which walks example indices only (`_rows`); the batches are PRM rows."""

  def __init__(self, examples: Sequence[dict], batch_size: int, seq_len: int, *, seed: int = 0,
               pad_id: int = 0, state: dict | None = None, process_index: int = 0,
               process_count: int = 1):
    if not examples:
      raise DataError("no PRM training examples (check data.path)")
    self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
    # One placeholder per example: without packing the walk needs only how many there are.
    index = [{"tokens": _TWO_TOKENS}] * len(examples)
    self._rows = BatchIterator(index, batch_size, seq_len, seed=seed, packing=False,
                               state=state, process_index=process_index,
                               process_count=process_count)

  @property
  def state(self) -> dict:
    return self._rows.state

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = [r for (r,) in self._rows.next_rows()]
    return make_batch(self.examples, rows, self.seq_len, self.pad_id)


@dataclasses.dataclass
class PRMData:
  """What `build_prm_dataset` returns."""
  train: PRMIterator
  eval_examples: list
  stats: DataStats
  eval_stats: DataStats
  seq_len: int
  eval_batch_size: int
  pad_id: int = 0
  process_index: int = 0
  process_count: int = 1

  def eval_batches(self, batch_size: int | None = None) -> list[dict[str, np.ndarray]]:
    """One pass in order; the last batch is completed with all-padding rows."""
    bs = batch_size or self.eval_batch_size
    local = bs // self.process_count
    out = []
    for start in range(0, len(self.eval_examples), bs):
      rows = list(range(start, min(start + bs, len(self.eval_examples))))
      rows += [None] * (bs - len(rows))
      mine = rows[self.process_index * local:(self.process_index + 1) * local]
      out.append(make_batch(self.eval_examples, mine, self.seq_len, self.pad_id))
    return out


def build_prm_dataset(data_config: Any, tokenizer, seq_len: int, batch_size: int, *,
                      seed: int = 0, state: dict | None = None,
                      eval_batch_size: int | None = None, process_index: int = 0,
                      process_count: int = 1) -> PRMData:
  """Read and tokenize PRM rows: `data.sources` / `data.eval_sources` (or the `path` /
  `eval_path` shortcuts), `eval_fraction`, `step_separator`, `fields`, `skip_malformed`.
  Rows hold at most seq_len + 1 tokens, as the other trainers' rows (inputs + one)."""
  seed = int(cfg_get(data_config, "seed", seed))
  separator = cfg_get(data_config, "step_separator", "\n")
  n = seq_len + 1

  def prepare(source, records=None):
    skip = bool(cfg_get(source, "skip_malformed", cfg_get(data_config, "skip_malformed", False)))
    if records is None:
      records = load_records(source, skip)
    fields = {**dict(cfg_get(data_config, "fields", {}) or {}),
              **dict(cfg_get(source, "fields", {}) or {})}
    return tokenize_prm_records(records, tokenizer, n, separator=separator, fields=fields,
                                skip_malformed=skip)

  train, evals, stats, eval_stats = collect_sources(data_config, prepare, seed, "PRM rows")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  it = PRMIterator(train, batch_size, n, seed=seed, pad_id=pad_id, state=state,
                   process_index=process_index, process_count=process_count)
  return PRMData(train=it, eval_examples=evals, stats=stats, eval_stats=eval_stats, seq_len=n,
                 eval_batch_size=eval_batch_size or batch_size, pad_id=pad_id,
                 process_index=process_index, process_count=process_count)
