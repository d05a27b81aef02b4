"""Preference data for DPO and reward modelling: (prompt, chosen, rejected) -> paired batches.

Formats (field names map through `fields`, e.g. `{"chosen": "good", "role": "from"}`):

  auto   each row as TRL reads it: `chat` when chosen, rejected or prompt is a message list
         (TRL's "conversational" rows), else `pairs` (its "standard" rows).
  pairs  prompt, chosen, rejected: strings. `[bos] + prompt + response + [eos]`, the prompt and
         the response tokenized separately (as `formats` does for prompt_completion; `[bos]` is
         what tokenizer(text) adds, as TRL, unless `add_bos` overrides it); with
         `chat_template=True` the prompt is one user turn and the response one assistant turn,
         rendered with the tokenizer's chat template. Without a `prompt` field the prompt is
         implicit: the common prefix of chosen and rejected (TRL's `extract_prompt`).
  chat   chosen, rejected: message lists [{role, content}] that share the prompt turns and end
         with different assistant turns (the HH-RLHF / UltraFeedback-binarized layout; a
         `prompt` string beside them is ignored). Or `prompt` a message list and chosen /
         rejected the response turn alone; or `prompt` a string (one user turn) and chosen /
         rejected single assistant turns.

Every pair becomes

  {"chosen": int32 [n1], "chosen_mask": bool [n1], "rejected": int32 [n2],
   "rejected_mask": bool [n2], "prompt_len": int}

with chosen[:prompt_len] == rejected[:prompt_len] (the prompt is tokenized once) and each mask
True on its response tokens, end-of-turn / EOS included: the tokens whose log-probs DPO sums. A
chat response ends at its end-of-turn token (whitespace the template puts after it is left out).
Chat sequences are the template's own tokens whenever the prompt's tokens are a prefix of the
whole rendering's; otherwise the response is tokenized on its own after the prompt's tokens.

Malformed rows (a missing or empty field, chosen equal to rejected, chat lists whose prompts
differ) raise a one-line `DataError` naming the file, row and field, or with
`skip_malformed=True` are counted and skipped.

Overflow: as in `formats`, n tokens fill n - 1 (input, target) positions, so a side fits a row of
seq_len when n <= seq_len + 1. A pair with a longer side is dropped (`overflow="drop"`) or
truncated ("truncate"), as TRL truncates preference pairs: the prompt gives way first, cut from
the LEFT (it keeps its last tokens, and BOS stays first) as far as needed to fit the longer
response, though not below `max_prompt_length` tokens; then the responses are cut from the right
to fit. `max_prompt_length` 0 (the default) is half of seq_len: TRL's DPO defaults were
max_prompt_length=512 of max_length=1024 (TRL 1.x dropped the key and cuts the whole sequence
from the right instead, which loses the responses of a long prompt). A prompt that fits is never
cut. Without such a budget a long prompt leaves one response token, often the same on both sides:
a pair whose two sides are then identical (`identical_sides`) adds nothing to the loss. Their
count is logged as a warning, and data where every train pair is such a pair is refused.

Batches (`PreferenceIterator`, `eval_batches`) hold B pairs as 2B right-padded rows, never packed:
rows 0..B-1 the chosen sides, rows B..2B-1 the matching rejected ones (with several processes,
each process's rows: its B / P chosen, then their rejected). The arrays are those of `packing`:

  inputs       int32   [2B, T]  tokens[:-1], `pad_id` on padding
  targets      int32   [2B, T]  tokens[1:], 0 on padding
  weights      float32 [2B, T]  1 where the target is a response token (mask[1:]), else 0
  segment_ids  int32   [2B, T]  1 on the sequence, 0 on padding (the attention mask)
  positions    int32   [2B, T]  0, 1, ... along the sequence; 0 on padding

so a side's log-prob is `sum(token_logprobs * weights, -1)`. Eval padding pairs have all-zero
weights on both sides. For sampling-based evaluation, `tokenize_prompt(s)` gives a record's prompt
exactly as its pair starts, and `prompt_batches` left-pads prompts for `sampling.generate`
(`rollout.left_pad`, the one prompt padding).

`build_preference_dataset` reads the keys of `ftjax.data.build_dataset`'s config (sources,
format: auto | pairs | chat, fields, overflow: truncate | drop, skip_malformed, chat_template,
add_bos, eval_fraction, eval_sources, seed, cache_dir) plus `max_prompt_length` (the older name
`max_prompt_len` is read too); `packing` and `loss_on_prompt` do not apply.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from ftjax import rollout
from ftjax.data import cache, pipeline
from ftjax.data.formats import (DataStats, _field, _ids, _messages, _pc_example,
                                _render, _RowError, add_bos_option, bos_ids, check_tokenizer,
                                collect_sources, each_record)
from ftjax.data.pipeline import BatchIterator
from ftjax.data.sources import DataError, Records, cfg_get, describe, load_records
from ftjax.errors import UserError

PREFERENCE_FORMATS = ("auto", "pairs", "chat")
PREFERENCE_OVERFLOW = ("truncate", "drop")


# --- records -> pairs ----------------------------------------------------------------------------

def _prompt_list(record: Mapping, fields: Mapping[str, str]) -> list[dict]:
  """The `prompt` message list, checked like `formats` checks a conversation."""
  key = fields.get("prompt", "prompt")
  role_key, content_key = fields.get("role", "role"), fields.get("content", "content")
  # `_messages` wants an assistant turn somewhere; a placeholder one after the prompt satisfies it
  # and leaves the error messages (which name prompt[i]) unchanged.
  filler = {role_key: "assistant", content_key: "-"}
  return _messages({key: list(record[key]) + [filler]}, {**fields, "messages": key})[:-1]


def is_conversational(record: Mapping, fields: Mapping[str, str]) -> bool:
  """Whether a row holds message lists (TRL's `is_conversational`): chosen, rejected or prompt is
  a list whose first item is an object with a role."""
  role_key = fields.get("role", "role")
  for name in ("chosen", "rejected", "prompt"):
    value = record.get(fields.get(name, name))
    if isinstance(value, list) and value and isinstance(value[0], Mapping):
      return role_key in value[0]
  return False


def _resolve(format: str, record: Mapping, fields: Mapping[str, str]) -> str:
  if format == "auto":
    return "chat" if is_conversational(record, fields) else "pairs"
  return format


def _pair_strings(record: Mapping, fields: Mapping[str, str]) -> tuple[str, str, str]:
  """(prompt, chosen, rejected) of a pairs-format record. Without a prompt field the prompt is
  implicit: the longest common prefix of chosen and rejected, less a space that ends it, as
  TRL's `extract_prompt` takes it."""
  ck, rk, pk = (fields.get(k, k) for k in ("chosen", "rejected", "prompt"))
  for key in (ck, rk, pk):
    if isinstance(record.get(key), list):
      raise _RowError(key, "is a list: message lists take format=chat (or auto)")
  chosen = _field(record, fields, "chosen")
  rejected = _field(record, fields, "rejected")
  if record.get(pk) is not None:
    return _field(record, fields, "prompt", allow_empty=True), chosen, rejected
  n = 0
  while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
    n += 1
  if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
    n -= 1
  for key, text in ((ck, chosen[n:]), (rk, rejected[n:])):
    if not text.strip():
      raise _RowError(key, f"has nothing after the prompt it shares with the other side "
                      f"(no '{pk}' field, so the prompt is their common prefix)")
  return chosen[:n], chosen[n:], rejected[n:]


def _pair_messages(record: Mapping, fields: Mapping[str, str]):
  """(prompt turns, chosen turn, rejected turn) of a chat-format record."""
  ck, rk, pk = (fields.get(k, k) for k in ("chosen", "rejected", "prompt"))
  for key in (ck, rk):
    if isinstance(record.get(key), str):
      raise _RowError(key, "is a string: plain-text pairs take format=pairs (or auto)")
  chosen = _messages(record, {**fields, "messages": ck})
  rejected = _messages(record, {**fields, "messages": rk})
  prompt = record.get(pk)
  if isinstance(prompt, list):
    prompt = _prompt_list(record, fields)
    n = len(prompt)
    whole = chosen[:n] == prompt == rejected[:n] and min(len(chosen), len(rejected)) > n
    if not whole:
      chosen, rejected = prompt + chosen, prompt + rejected  # chosen / rejected are responses
  elif isinstance(prompt, str):
    if all(m["role"] == "assistant" for m in chosen + rejected):
      user = [{"role": "user", "content": prompt}]
      chosen, rejected = user + chosen, user + rejected
  elif prompt is not None:
    raise _RowError(pk, f"should be a string or a list of {{role, content}}, got "
                    f"{type(prompt).__name__}")
  for key, msgs in ((ck, chosen), (rk, rejected)):
    if msgs[-1]["role"] != "assistant":
      raise _RowError(key, "should end with an assistant turn (the response)")
    if len(msgs) < 2:
      raise _RowError(key, "has no prompt turns before the response")
  if chosen[:-1] != rejected[:-1]:
    n = min(len(chosen), len(rejected)) - 1
    turn = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    raise _RowError(rk, f"has a different prompt from '{ck}' (turn {turn} differs)")
  if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
    raise _RowError(rk, f"equals '{ck}'")
  return chosen[:-1], chosen[-1], rejected[-1]


def _response(tokenizer, prompt_ids: list[int], n_prompt: int, full: str, key: str):
  """Tokens and mask of the response that follows the prompt's n_prompt characters in `full`."""
  enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
  ids = list(enc["input_ids"])
  offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)  # [n, 2]
  p = len(prompt_ids)
  if ids[:p] == prompt_ids and (p == len(ids) or offsets[p, 0] >= n_prompt):
    ids, offsets = ids[p:], offsets[p:] - n_prompt
  else:  # the prompt/response boundary falls inside a token: tokenize the response alone
    enc = tokenizer(full[n_prompt:], add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
  end = len(full.rstrip()) - n_prompt  # the turn ends at its end-of-turn token
  inside = np.flatnonzero(offsets[:, 0] < end)
  k = int(inside[-1]) + 1 if len(inside) else 0
  mask = offsets[:k, 1] > offsets[:k, 0]
  if not mask.any():
    raise _RowError(key, "has an empty response")
  return np.asarray(ids[:k], np.int32), mask


def _chat_pair(tokenizer, prompt: list[dict], chosen: dict, rejected: dict,
               fields: Mapping[str, str]) -> dict:
  prompt_text = _render(tokenizer, prompt, True)
  prompt_ids = _ids(tokenizer, prompt_text)
  out = {"prompt_len": len(prompt_ids)}
  for side, turn in (("chosen", chosen), ("rejected", rejected)):
    key = fields.get(side, side)
    full = _render(tokenizer, prompt + [turn], False)
    if not full.startswith(prompt_text):
      raise _RowError(key, "cannot be located: the chat template does not render the prompt as "
                      "a prefix of the conversation")
    tokens, mask = _response(tokenizer, prompt_ids, len(prompt_text), full, key)
    out[side] = np.concatenate([np.asarray(prompt_ids, np.int32), tokens])  # [n]
    out[f"{side}_mask"] = np.concatenate([np.zeros(len(prompt_ids), bool), mask])
  return out


def tokenize_preference(record: Mapping, tokenizer, format: str, *,
                        fields: Mapping[str, str] | None = None, chat_template: bool = False,
                        add_bos: bool | None = None) -> dict:
  """One record -> a pair dict (see the module docstring).

  Raises `DataError("field 'x' ...")` for a malformed record; the caller adds the file and row.
  """
  fields = dict(fields or {})
  try:
    if not isinstance(record, Mapping):
      raise _RowError("*", f"row should be an object, got {type(record).__name__}")
    if _resolve(format, record, fields) == "chat":
      if format == "auto":
        _check_chat(tokenizer)
      return _chat_pair(tokenizer, *_pair_messages(record, fields), fields)
    if format not in PREFERENCE_FORMATS:
      raise _unknown_format(format)
    prompt, chosen, rejected = _pair_strings(record, fields)
    if chosen.strip() == rejected.strip():
      raise _RowError(fields.get("rejected", "rejected"),
                      f"equals '{fields.get('chosen', 'chosen')}'")
    if chat_template:
      user = [{"role": "user", "content": prompt}]
      return _chat_pair(tokenizer, user, {"role": "assistant", "content": chosen},
                        {"role": "assistant", "content": rejected}, fields)
    c = _pc_example(tokenizer, prompt, chosen, False, add_bos)
    r = _pc_example(tokenizer, prompt, rejected, False, add_bos)
    return {"chosen": c["tokens"], "chosen_mask": c["loss_mask"], "rejected": r["tokens"],
            "rejected_mask": r["loss_mask"], "prompt_len": int(np.argmax(c["loss_mask"]))}
  except _RowError as e:
    raise DataError(str(e)) from None


def _unknown_format(format: str) -> DataError:
  return DataError(f"unknown preference format {format!r} (use {', '.join(PREFERENCE_FORMATS)})")


def _check(tokenizer, format: str, chat_template: bool):
  """Config-level checks, raised at once rather than per row."""
  if format not in PREFERENCE_FORMATS:
    raise _unknown_format(format)
  check_tokenizer(tokenizer, "chat" if format == "chat" else "prompt_completion", chat_template)


def _check_chat(tokenizer):
  """format=auto met a conversational row: the tokenizer must be able to render it. A plain
  UserError, not a DataError, so that skip_malformed does not skip every row for it."""
  try:
    check_tokenizer(tokenizer, "chat")
  except DataError as e:
    raise UserError(f"data.format=auto found message lists: {e}") from None


# --- overflow ------------------------------------------------------------------------------------

def _cut_left(tokens: np.ndarray, keep: int, bos_id: int | None) -> np.ndarray:
  """The last `keep` tokens, except that a leading BOS stays first."""
  if keep >= len(tokens):
    return tokens
  head = tokens[:1] if bos_id is not None and keep >= 2 and tokens[0] == bos_id else tokens[:0]
  return np.concatenate([head, tokens[len(tokens) - (keep - len(head)):]])


def resolve_max_prompt_length(value: Any, seq_len: int) -> int:
  """`data.max_prompt_length` as a token count: 0 or None is half of seq_len (at least 1)."""
  if value is None or value == 0:
    return max(1, int(seq_len) // 2)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise DataError(f"data.max_prompt_length={value!r}: expected a token count >= 1, or 0 for "
                    "half of train.seq_len")
  return int(value)


def fit_pair(example: dict, seq_len: int, overflow: str = "truncate",
             max_prompt_length: int | None = None, bos_id: int | None = None
             ) -> tuple[dict | None, str | None]:
  """Fit a pair to rows of seq_len: (pair or None, what happened: None|truncated|dropped).

  A pair that overflows keeps at least `max_prompt_length` prompt tokens (0 / None: half of
  seq_len) and more where the longer response leaves room; see the module docstring."""
  n_max = seq_len + 1  # n tokens make n - 1 (input, target) positions
  p = example["prompt_len"]
  longest = max(len(example["chosen"]), len(example["rejected"])) - p
  event = None
  if p + longest > n_max:
    if overflow == "drop":
      return None, "dropped"
    if overflow != "truncate":
      raise DataError(f"unknown overflow mode {overflow!r} (use "
                      f"{', '.join(PREFERENCE_OVERFLOW)})")
    floor = min(resolve_max_prompt_length(max_prompt_length, seq_len), n_max - 1)
    keep = min(p, max(floor, n_max - longest))
    prompt = _cut_left(example["chosen"][:p], keep, bos_id)
    room = n_max - keep  # >= 1 response token
    out = {"prompt_len": keep}
    for side in ("chosen", "rejected"):
      tokens, mask = example[side], example[f"{side}_mask"]
      out[side] = np.concatenate([prompt, tokens[p:p + room]])
      out[f"{side}_mask"] = np.concatenate([np.zeros(keep, bool), mask[p:p + room]])
    example, event = out, "truncated"
  for side in ("chosen", "rejected"):
    if not example[f"{side}_mask"][1:].any():  # no response token is a target
      return None, "dropped"
  return example, event


def _scored_part(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The tokens and mask a side's log-prob depends on: up to its last response target."""
  targets = np.flatnonzero(mask[1:])  # position j predicts token j + 1
  end = int(targets[-1]) + 2 if len(targets) else 0
  return tokens[:end], mask[:end]


def identical_sides(example: dict) -> bool:
  """Whether the pair's chosen and rejected sides score the same tokens in the same context
  (truncation cut both to the same response tokens): such a pair adds nothing to a DPO or
  reward loss."""
  (c, cm), (r, rm) = (_scored_part(example[s], example[f"{s}_mask"])
                      for s in ("chosen", "rejected"))
  return len(c) == len(r) and bool(np.array_equal(c, r) and np.array_equal(cm, rm))


def count_identical(examples: Sequence[dict]) -> int:
  return sum(identical_sides(e) for e in examples)


# --- many records --------------------------------------------------------------------------------

def count_pair_tokens(examples: Sequence[dict], stats: DataStats) -> DataStats:
  """Set stats.examples (pairs), tokens and target_tokens (both sides) from `examples`."""
  stats.examples = len(examples)
  stats.tokens = int(sum(len(e["chosen"]) + len(e["rejected"]) for e in examples))
  stats.target_tokens = int(sum(int(e["chosen_mask"][1:].sum() + e["rejected_mask"][1:].sum())
                                for e in examples))
  return stats


def tokenize_preference_records(records: Records | Sequence[Mapping], tokenizer, format: str,
                                seq_len: int, *, fields: Mapping[str, str] | None = None,
                                overflow: str = "truncate", skip_malformed: bool = False,
                                chat_template: bool = False, add_bos: bool | None = None,
                                max_prompt_length: int | None = None
                                ) -> tuple[list[dict], DataStats]:
  """Tokenize every record into a pair, fit it to seq_len, and count what happened.

  A malformed record raises `DataError("<file>: row <r>: field '<f>' ...")`, or with
  `skip_malformed=True` is counted in `stats.skipped` (the first few messages in `stats.errors`).
  """
  _check(tokenizer, format, chat_template)
  if overflow not in PREFERENCE_OVERFLOW:
    raise DataError(f"unknown overflow mode {overflow!r} (use {', '.join(PREFERENCE_OVERFLOW)})")
  resolve_max_prompt_length(max_prompt_length, seq_len)  # a bad value fails before any row
  make = lambda r: tokenize_preference(r, tokenizer, format, fields=fields,
                                       chat_template=chat_template, add_bos=add_bos)
  stats, examples = DataStats(), []
  for ex in each_record(records, make, skip_malformed, stats):
    ex, event = fit_pair(ex, seq_len, overflow, max_prompt_length, tokenizer.bos_token_id)
    if event == "truncated":
      stats.truncated += 1
    elif event == "dropped":
      stats.dropped += 1
    if ex is not None:
      examples.append(ex)
  return examples, count_pair_tokens(examples, stats)


# --- batches -------------------------------------------------------------------------------------

def _sides(examples: Sequence[dict], side: str) -> list[dict]:
  return [{"tokens": e[side], "loss_mask": e[f"{side}_mask"]} for e in examples]


def _join(chosen: dict, rejected: dict) -> dict[str, np.ndarray]:
  return {k: np.concatenate([chosen[k], rejected[k]]) for k in chosen}  # [2B, T]


class PreferenceIterator:
  """Infinite iterator of paired batches (see the module docstring), with a resumable state.

  The pair order, epochs, state `{"epoch", "row"}` (row = pair) and process sharding are those
  of `pipeline.BatchIterator` without packing: one BatchIterator walks the chosen sides and one
  the rejected, in lockstep.
  """

  def __init__(self, examples: Sequence[dict], batch_size: int, seq_len: int, *, seed: int = 0,
               pad_id: int = 0, state: dict | None = None, process_index: int = 0,
               process_count: int = 1):
    """Starts at `state`, or at epoch 0, row 0.

    Args:
      examples: pair dicts whose sides have 2..seq_len + 1 tokens (see `fit_pair`).
      batch_size: global pairs per batch B; a process's batches have 2B / process_count rows.
      state: a previous `iterator.state` to resume from.
    """
    self.examples, self.seq_len, self.seed, self.pad_id = examples, seq_len, seed, pad_id
    self.batch_size = batch_size
    kw = dict(seed=seed, packing=False, pad_id=pad_id, state=state, process_index=process_index,
              process_count=process_count)
    self._chosen = BatchIterator(_sides(examples, "chosen"), batch_size, seq_len, **kw)
    self._rejected = BatchIterator(_sides(examples, "rejected"), batch_size, seq_len, **kw)

  @property
  def state(self) -> dict:
    """Where the next batch starts: `{"epoch": int, "row": int}`."""
    return self._chosen.state

  @property
  def process_index(self) -> int:
    return self._chosen.process_index

  @property
  def process_count(self) -> int:
    return self._chosen.process_count

  def shard(self, process_index: int, process_count: int) -> PreferenceIterator:
    """The same stream and state, keeping this process's pairs of every global batch."""
    return PreferenceIterator(self.examples, self.batch_size, self.seq_len, seed=self.seed,
                              pad_id=self.pad_id, state=self.state, process_index=process_index,
                              process_count=process_count)

  def layout(self, epoch: int) -> list[list[int]]:
    """Epoch `epoch`'s pair order, as one-pair rows."""
    return self._chosen.layout(epoch)

  def efficiency(self, epoch: int | None = None) -> float:
    """Non-pad positions / all positions over both sides of one epoch."""
    return (self._chosen.efficiency(epoch) + self._rejected.efficiency(epoch)) / 2

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return _join(next(self._chosen), next(self._rejected))


def eval_batches(examples: Sequence[dict], batch_size: int, seq_len: int, *, pad_id: int = 0,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """One pass over the pairs in order; the last batch is completed with all-padding pairs."""
  kw = dict(packing=False, pad_id=pad_id, process_index=process_index,
            process_count=process_count)
  chosen = pipeline.eval_batches(_sides(examples, "chosen"), batch_size, seq_len, **kw)
  rejected = pipeline.eval_batches(_sides(examples, "rejected"), batch_size, seq_len, **kw)
  return [_join(c, r) for c, r in zip(chosen, rejected)]


# --- prompts for sampling ------------------------------------------------------------------------

def tokenize_prompt(record: Mapping, tokenizer, format: str = "pairs", *,
                    fields: Mapping[str, str] | None = None, chat_template: bool = False,
                    add_bos: bool | None = None) -> np.ndarray:
  """A record's prompt tokens, int32 [n], ending where generation starts.

  For a preference record these are its pair's first prompt_len tokens. A prompt-only record has
  `prompt`: a message list (rendered with the generation prompt), or a string (a user turn when
  the format is chat or `chat_template`, else `[bos] + prompt`).
  """
  fields = dict(fields or {})
  try:
    if not isinstance(record, Mapping):
      raise _RowError("*", f"row should be an object, got {type(record).__name__}")
    if format not in PREFERENCE_FORMATS:
      raise _unknown_format(format)
    format = _resolve(format, record, fields)
    has_pair = record.get(fields.get("chosen", "chosen")) is not None
    if format == "chat" and has_pair:
      messages = _pair_messages(record, fields)[0]
    elif isinstance(record.get(fields.get("prompt", "prompt")), list):
      messages = _prompt_list(record, fields)
    else:
      text = (_pair_strings(record, fields)[0] if has_pair
              else _field(record, fields, "prompt", allow_empty=True))
      if format != "chat" and not chat_template:
        return np.asarray(bos_ids(tokenizer, add_bos) + (_ids(tokenizer, text) if text else []),
                          np.int32)
      messages = [{"role": "user", "content": text}]
    if not messages:
      raise _RowError(fields.get("prompt", "prompt"), "is empty")
    return np.asarray(_ids(tokenizer, _render(tokenizer, messages, True)), np.int32)
  except _RowError as e:
    raise DataError(str(e)) from None


def tokenize_prompts(records: Records | Sequence[Mapping], tokenizer, format: str = "pairs", *,
                     fields: Mapping[str, str] | None = None, chat_template: bool = False,
                     add_bos: bool | None = None, skip_malformed: bool = False,
                     max_len: int | None = None) -> tuple[list[np.ndarray], DataStats]:
  """`tokenize_prompt` over records; prompts longer than max_len are cut from the left (BOS kept).

  `stats.truncated` counts the cut prompts; `stats.tokens` is their total length.
  """
  _check(tokenizer, format, chat_template)
  make = lambda r: tokenize_prompt(r, tokenizer, format, fields=fields,
                                   chat_template=chat_template, add_bos=add_bos)
  stats, prompts = DataStats(), []
  for p in each_record(records, make, skip_malformed, stats):
    if max_len is not None and len(p) > max_len:
      p = _cut_left(p, max_len, tokenizer.bos_token_id)
      stats.truncated += 1
    prompts.append(p)
  stats.examples, stats.tokens = len(prompts), int(sum(len(p) for p in prompts))
  return prompts, stats


def prompt_batches(prompts: Sequence[np.ndarray], batch_size: int, *, pad_id: int = 0,
                   process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Left-padded batches of prompts, in order, for `sampling.generate`.

  Returns dicts of `tokens` int32 [B, T] (`pad_id` on padding), `mask` bool [B, T] (False on
  padding) and `valid` bool [B]; T is the longest prompt of the global batch. The last batch is
  completed with filler rows (valid False, one unmasked pad token, as `generate` wants the last
  column unmasked).
  """
  if batch_size % process_count:
    raise UserError(f"train.batch_size {batch_size} is not divisible by {process_count} "
                    "processes")
  local = batch_size // process_count
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    t = max(len(p) for p in chunk)
    mine = chunk[process_index * local:(process_index + 1) * local]
    tokens, mask = rollout.left_pad(mine, pad_id, length=t, rows=local)  # [B, T]
    out.append({"tokens": tokens, "mask": mask, "valid": np.arange(local) < len(mine)})
  return out


# --- the whole dataset ---------------------------------------------------------------------------

@dataclasses.dataclass
class PreferenceData:
  """What `build_preference_dataset` returns."""
  train: PreferenceIterator    # infinite; `train.state` is the resumable position
  eval_examples: list          # pair dicts, in a fixed order
  stats: DataStats             # train: counts (examples = pairs), tokens of both sides
  eval_stats: DataStats
  seq_len: int
  eval_batch_size: int
  pad_id: int
  process_index: int = 0
  process_count: int = 1

  def eval_batches(self, batch_size: int | None = None) -> list[dict[str, np.ndarray]]:
    """One pass over the eval pairs; the last batch is padded with empty pairs."""
    return eval_batches(self.eval_examples, batch_size or self.eval_batch_size, self.seq_len,
                        pad_id=self.pad_id, process_index=self.process_index,
                        process_count=self.process_count)

  def eval_prompt_batches(self, batch_size: int | None = None) -> list[dict[str, np.ndarray]]:
    """The eval pairs' prompts, left-padded (see `prompt_batches`), for sampling."""
    prompts = [e["chosen"][:e["prompt_len"]] for e in self.eval_examples]
    return prompt_batches(prompts, batch_size or self.eval_batch_size, pad_id=self.pad_id,
                          process_index=self.process_index, process_count=self.process_count)


def prepare_preference_source(source: Any, tokenizer, seq_len: int, data_config: Any = None, *,
                              records: Records | None = None, tokenize: Any = None
                              ) -> tuple[list[dict], DataStats]:
  """Load (unless `records` is given) and tokenize one source; its own keys beat data_config's.
  `tokenize` (default `tokenize_preference_records`) is KTO's for unpaired rows."""
  data_config = data_config or {}
  opt = lambda k, d=None: cfg_get(source, k, cfg_get(data_config, k, d))
  fmt = opt("format")
  if fmt is None:
    raise DataError(f"data source {describe(source)}: no format (set data.format or the "
                    f"source's format: {', '.join(PREFERENCE_FORMATS)})")
  if records is None:
    records = load_records(source, bool(opt("skip_malformed", False)))
  return (tokenize or tokenize_preference_records)(
      records, tokenizer, fmt, seq_len, fields=opt("fields"), overflow=opt("overflow", "truncate"),
      skip_malformed=bool(opt("skip_malformed", False)),
      chat_template=bool(opt("chat_template", False)), add_bos=add_bos_option(opt("add_bos")),
      max_prompt_length=opt("max_prompt_length") or opt("max_prompt_len"))


def _truncation_hint(data_config: Any, seq_len: int) -> str:
  mpl = cfg_get(data_config, "max_prompt_length") or cfg_get(data_config, "max_prompt_len")
  return (f"after truncation to train.seq_len={seq_len} with data.max_prompt_length="
          f"{resolve_max_prompt_length(mpl, seq_len)}")


def _refuse_all_identical(examples: Sequence[dict], data_config: Any, seq_len: int):
  """Every train pair identical on both sides: training would learn nothing (loss log 2, zero
  gradients, exit 0), so the data is refused."""
  n = count_identical(examples)
  if examples and n == len(examples):
    files = ", ".join(describe(s) for s in cfg_get(data_config, "sources", []))
    raise DataError(f"{files}: all {n} preference pairs have identical chosen and rejected sides "
                    f"{_truncation_hint(data_config, seq_len)} (nothing to learn); lower "
                    "data.max_prompt_length or raise train.seq_len")


def _warn_identical(train: Sequence[dict], evals: Sequence[dict], data_config: Any,
                    seq_len: int):
  n, n_eval = count_identical(train), count_identical(evals)
  if n or n_eval:
    files = ", ".join(describe(s) for s in cfg_get(data_config, "sources", []))
    logging.warning("%s: %d of %d train pairs (and %d of %d eval pairs) have identical chosen and "
                    "rejected sides %s: they add nothing to the loss; lower "
                    "data.max_prompt_length or raise train.seq_len", files, n, len(train),
                    n_eval, len(evals), _truncation_hint(data_config, seq_len))


def build_preference_dataset(data_config: Any, tokenizer, seq_len: int, batch_size: int, *,
                             seed: int = 0, state: dict | None = None,
                             eval_batch_size: int | None = None, process_index: int = 0,
                             process_count: int = 1) -> PreferenceData:
  """Read, tokenize, mix and batch preference pairs, as `ftjax.data.build_dataset` does SFT data.

  Args:
    seq_len: row length T of every batch.
    batch_size: global pairs per batch B (2B rows); each process gets 2B / process_count rows.
    seed: shuffles, the mix and the eval hold-out (`data.seed` overrides it); the hold-out picks
      the same records as `build_dataset` would.
    state: a saved `PreferenceData.train.state` to resume from.
  """
  seed = int(cfg_get(data_config, "seed", seed))
  prepare = lambda source, records=None: prepare_preference_source(
      source, tokenizer, seq_len, data_config, records=records)

  def build():
    out = collect_sources(data_config, prepare, seed, "pairs")
    _refuse_all_identical(out[0], data_config, seq_len)  # before the cache keeps it
    return out
  train_examples, eval_examples, stats, eval_stats = cache.load_or_build(
      cfg_get(data_config, "cache_dir"), data_config, "pairs", tokenizer, seq_len, seed, build)
  _warn_identical(train_examples, eval_examples, data_config, seq_len)
  count_pair_tokens(train_examples, stats)
  count_pair_tokens(eval_examples, eval_stats)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  train = PreferenceIterator(train_examples, batch_size, seq_len, seed=seed, pad_id=pad_id,
                             state=state, process_index=process_index,
                             process_count=process_count)
  stats.rows = 2 * len(train_examples)
  stats.packing_efficiency = train.efficiency(0)
  if eval_examples:
    eval_stats.rows = 2 * len(eval_examples)
    positions = eval_stats.tokens - eval_stats.rows  # n tokens fill n - 1 positions
    eval_stats.packing_efficiency = positions / (eval_stats.rows * seq_len)
  return PreferenceData(train=train, eval_examples=eval_examples, stats=stats,
                        eval_stats=eval_stats, seq_len=seq_len,
                        eval_batch_size=eval_batch_size or batch_size, pad_id=pad_id,
                        process_index=process_index, process_count=process_count)
