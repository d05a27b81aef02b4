"""The SFT data pipeline: sources -> formats -> packing -> a resumable batch iterator.

A training script calls

  data = build_dataset(config.data, tokenizer, seq_len=T, batch_size=B, seed=config.train.seed,
                       state=restored_data_state)
  for batch in data.train: ...          # dicts of numpy arrays, see `packing`
  save(..., data_state=data.train.state)
  for batch in data.eval_batches(): ...
  print(data.stats)

with `config.data` (a ConfigDict or dict) holding:

  sources         list of {path | hub | tfds, split, config, data_dir, limit,
                  weight (1.0), format, fields}; see `sources`
  format          default format for sources that give none: alpaca | prompt_completion |
                  chat | text (see `formats`)
  fields          default field-name mapping, e.g. {"instruction": "instr"}
  packing         True: several examples per row with segment ids; False: one per row
  pack_window     open rows first-fit packing looks at (16)
  overflow        truncate | drop | split, for examples longer than seq_len + 1 tokens
  skip_malformed  False: a malformed row raises DataError; True: it is counted and skipped
  loss_on_prompt  False: only completions / assistant turns are targets
  chat_template   False: alpaca / prompt_completion use the tokenizer's chat template if True
  add_bos         unset (None): non-chat formats start with the special tokens tokenizer(text)
                  itself adds (Llama's BOS; none for GPT-2 or Qwen), as TRL; True: with the
                  tokenizer's BOS (when it has one) all the same; False: with none
  eval_fraction   records of each source held out for eval (0.0), chosen by seed
  eval_sources    optional list of sources used for eval only (unweighted, unshuffled)
  cache_dir       tokenized examples are cached there, keyed by the sources' content, the
                  tokenizer and these settings (see `cache`); "" or None: no cache

Train sources are mixed by weight (`sources.mix`): source i gets weight_i / sum(weights) of an
epoch as long as the sources together. Eval examples are not mixed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ftjax.data import cache
from ftjax.data.formats import (DataStats, FORMATS, add_bos_option, bos_ids, collect_sources,
                                count_tokens, fit, tokenize_example, tokenize_records)
from ftjax.data.packing import BATCH_KEYS, make_batch, pack_rows
from ftjax.data.pipeline import BatchIterator, eval_batches
from ftjax.data.sources import (EVAL_STREAM, DataError, Records, cfg_get, describe,
                                load_records, mix, mix_counts)

__all__ = [
    "EVAL_STREAM", "BATCH_KEYS", "BatchIterator", "DataError", "DataStats", "FORMATS", "Records",
    "SFTData", "bos_ids",
    "build_dataset", "count_tokens", "eval_batches", "fit", "load_records", "make_batch", "mix",
    "mix_counts", "pack_rows", "prepare_source", "tokenize_example", "tokenize_records",
]



@dataclasses.dataclass
class SFTData:
  """What `build_dataset` returns."""
  train: BatchIterator         # infinite; `train.state` is the resumable position
  eval_examples: list          # {"tokens", "loss_mask"} dicts, in a fixed order
  stats: DataStats             # train: counts, tokens per epoch, packing efficiency
  eval_stats: DataStats
  seq_len: int
  eval_batch_size: int
  packing: bool
  pad_id: int
  process_index: int = 0
  process_count: int = 1

  def eval_batches(self, batch_size: int | None = None) -> list[dict[str, np.ndarray]]:
    """One pass over the eval examples, unpacked; the last batch is padded with empty rows."""
    return eval_batches(self.eval_examples, batch_size or self.eval_batch_size, self.seq_len,
                        packing=False, pad_id=self.pad_id, process_index=self.process_index,
                        process_count=self.process_count)


def prepare_source(source: Any, tokenizer, seq_len: int, data_config: Any = None, *,
                   records: Records | None = None) -> tuple[list[dict], DataStats]:
  """Load (unless `records` is given) and tokenize one source; its own keys beat data_config's."""
  data_config = data_config or {}
  opt = lambda k, d=None: cfg_get(source, k, cfg_get(data_config, k, d))
  fmt = opt("format")
  if fmt is None:
    raise DataError(f"data source {describe(source)}: no format (set data.format or the "
                    f"source's format: {', '.join(FORMATS)})")
  if records is None:
    records = load_records(source, bool(opt("skip_malformed", False)))
  return tokenize_records(records, tokenizer, fmt, seq_len, fields=opt("fields"),
                          overflow=opt("overflow", "truncate"),
                          skip_malformed=bool(opt("skip_malformed", False)),
                          loss_on_prompt=bool(opt("loss_on_prompt", False)),
                          chat_template=bool(opt("chat_template", False)),
                          add_bos=add_bos_option(opt("add_bos")))


def build_dataset(data_config: Any, tokenizer, seq_len: int, batch_size: int, *, seed: int = 0,
                  state: dict | None = None, eval_batch_size: int | None = None,
                  process_index: int = 0, process_count: int = 1) -> SFTData:
  """Read, tokenize, mix and batch `data_config` (see the module docstring).

  Args:
    seq_len: row length T of every batch.
    batch_size: global train rows per batch; each process gets batch_size / process_count.
    seed: shuffles, the mix and the eval hold-out (`data.seed` overrides it).
    state: a saved `SFTData.train.state` to resume from.
  """
  seed = int(cfg_get(data_config, "seed", seed))
  prepare = lambda source, records=None: prepare_source(source, tokenizer, seq_len, data_config,
                                                       records=records)
  train_examples, eval_examples, stats, eval_stats = cache.load_or_build(
      cfg_get(data_config, "cache_dir"), data_config, "sft", tokenizer, seq_len, seed,
      lambda: collect_sources(data_config, prepare, seed))
  count_tokens(train_examples, stats)
  count_tokens(eval_examples, eval_stats)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  packing = bool(cfg_get(data_config, "packing", True))
  train = BatchIterator(train_examples, batch_size, seq_len, seed=seed, packing=packing,
                        pad_id=pad_id, pack_window=int(cfg_get(data_config, "pack_window", 16)),
                        state=state, process_index=process_index, process_count=process_count)
  stats.rows = len(train.layout(0))
  stats.packing_efficiency = train.efficiency(0)
  if eval_examples:
    eval_stats.rows = len(eval_examples)
    lengths = [len(e["tokens"]) - 1 for e in eval_examples]
    eval_stats.packing_efficiency = sum(lengths) / (len(lengths) * seq_len)
  return SFTData(train=train, eval_examples=eval_examples, stats=stats, eval_stats=eval_stats,
                 seq_len=seq_len, eval_batch_size=eval_batch_size or batch_size, packing=packing,
                 pad_id=pad_id, process_index=process_index, process_count=process_count)
