"""Unpaired preference data for KTO, in TRL's layout: rows (prompt, completion, label: bool).

  {"prompt": "The sky is", "completion": " blue.", "label": true}
  {"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}], "label": false}

`prompt` and `completion` are strings (TRL's "standard" rows: `[bos] + prompt + completion +
[eos]`, tokenized apart) or message lists (its "conversational" rows, rendered with the chat
template; a string prompt beside an assistant-turn completion is one user turn). Paired rows
(prompt, chosen, rejected; any layout `ftjax.data.preference` reads) are unpaired on the fly as
TRL's `unpair_preference_dataset` does: each gives (prompt, chosen, True) and (prompt, rejected,
False), in its order (per 1000 rows, the chosen then the rejected completions). A row with
neither a completion nor chosen/rejected, or a label that is not true/false, raises a one-line
`DataError` naming the file, row and field (or is skipped with `skip_malformed`).

KL rows. KTO's reference point is a KL estimate from mismatched (prompt, completion) pairs; as
TRL, the completions are rotated by one within each block of `batch_size` rows of the (mixed)
train order: row i's KL sequence is prompt_i + completion_{i-1} ((x1, yn), (x2, y1), ...).

Batches are preference batches (`ftjax.data.preference`, `PreferenceIterator`): rows [0, B) the
examples, rows [B, 2B) their KL sequences, plus

  kto_label  float32 [2B]  1 desirable, 0 undesirable on the example rows; -1 on the KL rows

so every row reordering of a preference batch (devices, micro-batches) keeps them aligned.
Overflow: as preference pairs (the prompt is cut from the left first); a KL sequence longer than
a row keeps the start of its completion.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from ftjax.data import cache
from ftjax.data import preference as pref
from ftjax.data.formats import (DataStats, _messages, _pc_example,
                                _RowError, collect_sources, each_record)
from ftjax.data.sources import DataError, Records, cfg_get, describe

UNPAIR_CHUNK = 1000  # datasets.map's default batch size, the blocks TRL unpairs


def _is_bool(v) -> bool:
  return isinstance(v, (bool, np.bool_))


def _example(tokenizer, record: Mapping, completion_key: str, label: bool, format: str,
             fields: Mapping[str, str], chat_template: bool, add_bos: bool | None) -> dict:
  """One (prompt, completion, label) -> {"prompt": int32 [p], "completion": int32 [c],
  "completion_mask": bool [c], "label": 1 | 0}."""
  pk = fields.get("prompt", "prompt")
  completion = record.get(completion_key)
  prompt = record.get(pk)
  if completion is None:
    raise _RowError(completion_key, "is missing")
  chat = pref._resolve(format, {"chosen": completion, "prompt": prompt},
                       {**fields, "chosen": "chosen", "prompt": "prompt"}) == "chat"
  if chat or chat_template:
    if format == "auto":
      pref._check_chat(tokenizer)
    if isinstance(completion, str):
      if not completion.strip():
        raise _RowError(completion_key, "is empty")
      turns = [{"role": "assistant", "content": completion}]
    else:
      turns = _messages({completion_key: completion}, {**fields, "messages": completion_key})
    if isinstance(prompt, list):
      msgs = pref._prompt_list(record, fields)
    elif isinstance(prompt, str):
      msgs = [{"role": "user", "content": prompt}]
    elif prompt is None:
      raise _RowError(pk, "is missing")
    else:
      raise _RowError(pk, f"should be a string or a list of {{role, content}}, got "
                      f"{type(prompt).__name__}")
    msgs = msgs + turns[:-1]
    if turns[-1]["role"] != "assistant":
      raise _RowError(completion_key, "should end with an assistant turn")
    if not msgs:
      raise _RowError(pk, "is empty")
    side = pref._chat_pair(tokenizer, msgs, turns[-1], turns[-1], fields)
    tokens, mask, p = side["chosen"], side["chosen_mask"], side["prompt_len"]
  else:
    if not isinstance(completion, str):
      raise _RowError(completion_key, f"should be a string, got {type(completion).__name__}")
    if prompt is not None and not isinstance(prompt, str):
      raise _RowError(pk, f"should be a string, got {type(prompt).__name__}")
    if not completion.strip():
      raise _RowError(completion_key, "is empty")
    ex = _pc_example(tokenizer, prompt or "", completion, False, add_bos)
    tokens, mask = ex["tokens"], ex["loss_mask"]
    p = int(np.argmax(mask))
  return {"prompt": tokens[:p], "completion": tokens[p:], "completion_mask": mask[p:],
          "label": int(bool(label))}  # an int: the tokenized-data cache stores ints


def tokenize_kto(record: Mapping, tokenizer, format: str = "auto", *,
                 fields: Mapping[str, str] | None = None, chat_template: bool = False,
                 add_bos: bool | None = None) -> list[tuple[str, dict]]:
  """One record -> [(group, example)]: an unpaired row gives one ("row", ex), a paired row
  ("chosen", ex) and ("rejected", ex) (TRL's unpairing). Raises DataError naming the field."""
  fields = dict(fields or {})
  try:
    if not isinstance(record, Mapping):
      raise _RowError("*", f"row should be an object, got {type(record).__name__}")
    if format not in pref.PREFERENCE_FORMATS:
      raise pref._unknown_format(format)
    ck, lk = fields.get("completion", "completion"), fields.get("label", "label")
    chosen, rejected = fields.get("chosen", "chosen"), fields.get("rejected", "rejected")
    kw = dict(format=format, fields=fields, chat_template=chat_template, add_bos=add_bos)
    if ck in record:
      label = record.get(lk)
      if not _is_bool(label):
        raise _RowError(lk, f"should be true or false (desirable or not), got {label!r}")
      return [("row", _example(tokenizer, record, ck, label, **kw))]
    if chosen in record or rejected in record:
      return [("chosen", _example(tokenizer, record, chosen, True, **kw)),
              ("rejected", _example(tokenizer, record, rejected, False, **kw))]
    raise _RowError(ck, f"is missing (KTO rows hold prompt, {ck}, {lk}; or paired rows "
                    f"prompt, {chosen}, {rejected})")
  except _RowError as e:
    raise DataError(str(e)) from None


def _fit(ex: dict, seq_len: int, overflow: str, max_prompt_length, bos_id) -> tuple:
  """`preference.fit_pair` on the example as both sides of a pair."""
  tokens = np.concatenate([ex["prompt"], ex["completion"]])
  mask = np.concatenate([np.zeros(len(ex["prompt"]), bool), ex["completion_mask"]])
  pair = {"chosen": tokens, "chosen_mask": mask, "rejected": tokens, "rejected_mask": mask,
          "prompt_len": len(ex["prompt"])}
  pair, event = pref.fit_pair(pair, seq_len, overflow, max_prompt_length, bos_id)
  if pair is None:
    return None, event
  p = pair["prompt_len"]
  return {"prompt": pair["chosen"][:p], "completion": pair["chosen"][p:],
          "completion_mask": pair["chosen_mask"][p:], "label": ex["label"]}, event


def tokenize_kto_records(records, tokenizer, format: str, seq_len: int, *, fields=None,
                         overflow: str = "truncate", skip_malformed: bool = False,
                         chat_template: bool = False, add_bos: bool | None = None,
                         max_prompt_length=None) -> tuple[list[dict], DataStats]:
  """Records -> KTO examples (unpaired in TRL's order), fitted to seq_len + 1 tokens."""
  pref._check(tokenizer, format, chat_template)
  if overflow not in pref.PREFERENCE_OVERFLOW:
    raise DataError(f"unknown overflow mode {overflow!r} (use "
                    f"{', '.join(pref.PREFERENCE_OVERFLOW)})")
  pref.resolve_max_prompt_length(max_prompt_length, seq_len)
  make = lambda r: tokenize_kto(r, tokenizer, format, fields=fields,
                                chat_template=chat_template, add_bos=add_bos)
  if not isinstance(records, Records):
    records = Records("<records>", records)
  stats, ordered = DataStats(), []
  chunk: dict[str, list] = {"row": [], "chosen": [], "rejected": []}
  made = each_record(records, make, skip_malformed, stats)
  for i, group in enumerate(made):
    for name, ex in group:
      chunk[name].append(ex)
    if (i + 1) % UNPAIR_CHUNK == 0:
      ordered += chunk["row"] + chunk["chosen"] + chunk["rejected"]
      chunk = {k: [] for k in chunk}
  ordered += chunk["row"] + chunk["chosen"] + chunk["rejected"]
  examples = []
  for ex in ordered:
    ex, event = _fit(ex, seq_len, overflow, max_prompt_length, tokenizer.bos_token_id)
    stats.truncated += event == "truncated"
    stats.dropped += event == "dropped"
    if ex is not None:
      examples.append(ex)
  stats.examples = len(examples)
  stats.tokens = int(sum(len(e["prompt"]) + len(e["completion"]) for e in examples))
  return examples, stats


def kl_pairs(examples: Sequence[dict], batch_size: int, seq_len: int) -> list[dict]:
  """Preference-layout pairs: "chosen" the example, "rejected" its KL sequence (prompt_i +
  completion_{i-1}, rotated within blocks of batch_size as TRL), plus the label."""
  out = []
  for start in range(0, len(examples), batch_size):
    block = examples[start:start + batch_size]
    for i, ex in enumerate(block):
      other = block[i - 1]  # i = 0 takes the block's last completion
      room = max(seq_len + 1 - len(ex["prompt"]), 1)
      kl_c, kl_m = other["completion"][:room], other["completion_mask"][:room]
      zeros = np.zeros(len(ex["prompt"]), bool)
      out.append({
          "chosen": np.concatenate([ex["prompt"], ex["completion"]]),
          "chosen_mask": np.concatenate([zeros, ex["completion_mask"]]),
          "rejected": np.concatenate([ex["prompt"], kl_c]),
          "rejected_mask": np.concatenate([zeros, kl_m]),
          "prompt_len": len(ex["prompt"]), "label": ex["label"]})
  return out


class KTOIterator(pref.PreferenceIterator):
  """`PreferenceIterator` over `kl_pairs`, adding each batch's `kto_label` [2B]."""

  def __next__(self) -> dict[str, np.ndarray]:
    it = self._chosen
    local = it.batch_size // it.process_count
    lo = it.process_index * local
    epoch, row, idx = it._epoch, it._row, []
    for k in range(it.batch_size):  # the rows BatchIterator.__next__ is about to emit
      rows = it.layout(epoch)
      if lo <= k < lo + local:
        idx += rows[row]
      row += 1
      if row == len(rows):
        epoch, row = epoch + 1, 0
    batch = super().__next__()
    labels = np.array([float(self.examples[i]["label"]) for i in idx], np.float32)
    return {**batch, "kto_label": np.concatenate([labels, -np.ones_like(labels)])}

  def shard(self, process_index: int, process_count: int) -> KTOIterator:
    return KTOIterator(self.examples, self.batch_size, self.seq_len, seed=self.seed,
                       pad_id=self.pad_id, state=self.state, process_index=process_index,
                       process_count=process_count)


def eval_batches(pairs: Sequence[dict], batch_size: int, seq_len: int, *, pad_id: int = 0,
                 process_index: int = 0, process_count: int = 1) -> list[dict]:
  """One pass in order (`preference.eval_batches`) with `kto_label`; padding rows get 0 (their
  weights are 0, so they count nowhere)."""
  out = []
  batches = pref.eval_batches(pairs, batch_size, seq_len, pad_id=pad_id,
                              process_index=process_index, process_count=process_count)
  local = batch_size // process_count
  for j, batch in enumerate(batches):
    chunk = list(pairs[j * batch_size:(j + 1) * batch_size])
    mine = chunk[process_index * local:(process_index + 1) * local]
    labels = np.zeros(local, np.float32)
    labels[:len(mine)] = [float(p["label"]) for p in mine]
    out.append({**batch, "kto_label": np.concatenate([labels, -np.ones_like(labels)])})
  return out


@dataclasses.dataclass
class KTOData(pref.PreferenceData):
  """What `build_kto_dataset` returns: `PreferenceData` whose pairs are `kl_pairs`."""

  def eval_batches(self, batch_size: int | None = None) -> list[dict]:
    return eval_batches(self.eval_examples, batch_size or self.eval_batch_size, self.seq_len,
                        pad_id=self.pad_id, process_index=self.process_index,
                        process_count=self.process_count)


def prepare_kto_source(source: Any, tokenizer, seq_len: int, data_config: Any = None, *,
                       records=None) -> tuple[list[dict], DataStats]:
  """One source's KTO examples: the preference loader with the unpaired tokenizer."""
  return pref.prepare_preference_source(source, tokenizer, seq_len, data_config,
                                        records=records, tokenize=tokenize_kto_records)


def build_kto_dataset(data_config: Any, tokenizer, seq_len: int, batch_size: int, *,
                      seed: int = 0, state: dict | None = None,
                      eval_batch_size: int | None = None, process_index: int = 0,
                      process_count: int = 1) -> KTOData:
  """Read, unpair, tokenize and batch KTO rows (keys as `build_preference_dataset`)."""
  seed = int(cfg_get(data_config, "seed", seed))
  prepare = lambda source, records=None: prepare_kto_source(
      source, tokenizer, seq_len, data_config, records=records)
  train, evals, stats, eval_stats = cache.load_or_build(
      cfg_get(data_config, "cache_dir"), data_config, "kto", tokenizer, seq_len, seed,
      lambda: collect_sources(data_config, prepare, seed, "examples"))
  if not train:
    raise DataError("no KTO training examples (check data.path)")
  if len({e["label"] for e in train}) < 2:
    files = ", ".join(describe(s) for s in cfg_get(data_config, "sources", []))
    raise DataError(f"{files}: every train row has label={bool(train[0]['label'])}; KTO needs both "
                    "desirable (true) and undesirable (false) rows")
  eval_bs = eval_batch_size or batch_size
  pairs, eval_pairs = kl_pairs(train, batch_size, seq_len), kl_pairs(evals, eval_bs, seq_len)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  it = KTOIterator(pairs, batch_size, seq_len, seed=seed, pad_id=pad_id, state=state,
                   process_index=process_index, process_count=process_count)
  stats.rows = 2 * len(pairs)
  return KTOData(train=it, eval_examples=eval_pairs, stats=stats, eval_stats=eval_stats,
                 seq_len=seq_len, eval_batch_size=eval_bs, pad_id=pad_id,
                 process_index=process_index, process_count=process_count)
