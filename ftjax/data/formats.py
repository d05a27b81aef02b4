"""Record formats -> token ids and loss masks.

Every format turns one record into an example `{"tokens": int32 [n], "loss_mask": bool [n]}`;
`loss_mask[t]` is True when token t is a target the model learns to predict.

  alpaca             instruction, input (optional), output. The prompt is the standard Stanford
                     Alpaca template; with `chat_template=True` it is instead one user turn
                     (instruction, a blank line, input) and one assistant turn rendered with the
                     tokenizer's chat template.
  prompt_completion  prompt, completion; with `chat_template=True`, a user and an assistant turn.
  chat               messages: [{role, content}], roles system / user / assistant, rendered with
                     `tokenizer.apply_chat_template(..., tokenize=False)`. Each assistant turn's
                     text (content plus end-of-turn token, trailing whitespace excluded) is the
                     difference between rendering messages[:i] with a generation prompt and
                     rendering messages[:i+1]; tokens overlapping it (by the fast tokenizer's
                     offsets) are targets. The tokens are exactly the template's (its BOS too).
  text               text: every token is a target (continued pretraining).

Non-chat formats are `[bos] + prompt + completion + [eos]`, the prompt and completion tokenized
separately so the boundary is exact; the completion and EOS are targets (everything with
`loss_on_prompt=True`). `[bos]` is what `tokenizer(text)` itself puts before the text, as TRL and
transformers pipelines tokenize (`add_bos=None`, the default): Llama's BOS, nothing for GPT-2 or
Qwen, nothing for a tokenizer with a `bos_token` that its post-processor does not add.
`add_bos=True` starts every sequence with the tokenizer's BOS (when it has one) all the same;
`add_bos=False` leaves it out even where the tokenizer adds it (see `bos_ids`).

Field names map through `fields`, e.g. `{"instruction": "instr", "output": "answer"}`; for chat,
`messages`, `role` and `content` can be renamed.

Overflow: an example of n tokens fills n - 1 (input, target) positions of a row of length
seq_len, so it fits when n <= seq_len + 1. Longer ones are truncated to seq_len + 1 tokens
(`overflow="truncate"`), dropped ("drop"), or cut into consecutive windows of seq_len + 1 tokens
that overlap by one token so no target is lost ("split"). An example left with no target is
dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ftjax.data.sources import (DataError, Records, cfg_get, describe, hold_out, load_records,
                                mix)

FORMATS = ("alpaca", "prompt_completion", "chat", "text")
ROLES = ("system", "user", "assistant")
OVERFLOW = ("truncate", "drop", "split")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclasses.dataclass
class DataStats:
  """Counts for one data build; `packing_efficiency` = non-pad positions / all positions."""
  records: int = 0         # rows read
  examples: int = 0        # examples kept (after mixing, for the train set)
  skipped: int = 0         # malformed rows skipped (skip_malformed=True)
  truncated: int = 0       # too long, truncated (or split into windows)
  dropped: int = 0         # too long with overflow="drop", or left with no target token
  tokens: int = 0          # tokens of the kept examples
  target_tokens: int = 0   # of which are targets (positions with weight 1)
  packing_efficiency: float | None = None
  rows: int | None = None  # rows of seq_len in one epoch
  errors: list = dataclasses.field(default_factory=list)  # the first few skipped-row messages

  def __add__(self, other: DataStats) -> DataStats:
    out = DataStats()
    for f in ("records", "examples", "skipped", "truncated", "dropped", "tokens",
              "target_tokens"):
      setattr(out, f, getattr(self, f) + getattr(other, f))
    out.errors = (self.errors + other.errors)[:MAX_ERRORS]
    return out

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  def __str__(self) -> str:
    eff = "n/a" if self.packing_efficiency is None else f"{self.packing_efficiency:.1%}"
    return (f"examples={self.examples} records={self.records} skipped={self.skipped} "
            f"truncated={self.truncated} dropped={self.dropped} tokens={self.tokens} "
            f"target_tokens={self.target_tokens} rows={self.rows} packing_efficiency={eff}")


MAX_ERRORS = 5


class _RowError(Exception):
  """A malformed record; the caller adds the file and row."""

  def __init__(self, field: str, problem: str):
    super().__init__(f"field '{field}' {problem}")


def _field(record: Mapping, fields: Mapping[str, str], name: str, *, required=True,
           allow_empty=False) -> str:
  key = fields.get(name, name)
  value = record.get(key)
  if value is None:
    if required:
      raise _RowError(key, "is missing")
    return ""
  if not isinstance(value, str):
    raise _RowError(key, f"should be a string, got {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise _RowError(key, "is empty")
  return value


def _messages(record: Mapping, fields: Mapping[str, str]) -> list[dict]:
  key = fields.get("messages", "messages")
  role_key, content_key = fields.get("role", "role"), fields.get("content", "content")
  msgs = record.get(key)
  if msgs is None:
    raise _RowError(key, "is missing")
  if not isinstance(msgs, list) or not msgs:
    raise _RowError(key, "should be a non-empty list of {role, content}")
  out = []
  for i, m in enumerate(msgs):
    where = f"{key}[{i}]"
    if not isinstance(m, Mapping):
      raise _RowError(where, f"should be an object, got {type(m).__name__}")
    role, content = m.get(role_key), m.get(content_key)
    if role is None:
      raise _RowError(f"{where}.{role_key}", "is missing")
    if role not in ROLES:
      raise _RowError(f"{where}.{role_key}", f"has unknown role {role!r} (use {', '.join(ROLES)})")
    if content is None:
      raise _RowError(f"{where}.{content_key}", "is missing")
    if not isinstance(content, str):
      raise _RowError(f"{where}.{content_key}", f"should be a string, got {type(content).__name__}")
    if role == "assistant" and not content.strip():
      raise _RowError(f"{where}.{content_key}", "is empty")
    out.append({"role": role, "content": content})
  if not any(m["role"] == "assistant" for m in out):
    raise _RowError(key, "has no assistant turn")
  return out


def _ids(tokenizer, text: str) -> list[int]:
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_ids(tokenizer, add_bos: bool | None = None) -> list[int]:
  """The ids a plain-text (non-chat) sequence starts with.

  None: the special tokens `tokenizer(text)` puts before the text, so that the sequences are
  TRL's (its SFT and DPO tokenize plain text with `tokenizer(text)`) and the log-probs are those
  a transformers pipeline computes. True / False: the tokenizer's BOS, or nothing, whatever the
  tokenizer itself does (the `add_bos` override).
  """
  if add_bos is None:
    # Where the text's own ids sit in the full encoding: what comes before is the post-
    # processor's prefix (a TemplateProcessing BOS), whatever the tokenizer calls it.
    probe = "a"
    plain, full = _ids(tokenizer, probe), list(tokenizer(probe)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
      if full[i:i + len(plain)] == plain:
        return full[:i]
    return []
  bos = tokenizer.bos_token_id
  return [bos] if add_bos and bos is not None else []


def add_bos_option(value: Any) -> bool | None:
  """`data.add_bos` as `bos_ids` takes it: None (unset: the tokenizer's own behaviour) or a bool."""
  if value is None or isinstance(value, (bool, np.bool_)):
    return None if value is None else bool(value)
  raise DataError(f"data.add_bos={value!r}: expected true, false, or unset (the tokenizer's own "
                  "special tokens, as tokenizer(text) adds them)")


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
  try:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
  except ImportError:
    raise  # a missing package (jinja2) is the install's fault, not the row's
  except Exception as e:  # a template may reject a conversation (e.g. no system role)
    raise _RowError("messages", f"is rejected by the chat template ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


def _chat_example(tokenizer, messages: list[dict], loss_on_prompt: bool) -> dict:
  text = _render(tokenizer, messages, False)
  spans = []  # character spans of assistant turns in `text`
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    full = _render(tokenizer, messages[:i + 1], False)
    start = _turn_start(tokenizer, messages, i, full)
    if start is None or not text.startswith(full):
      raise _RowError(f"messages[{i}]", "cannot be located: the chat template does not render "
                      "conversation prefixes as prefixes of the whole")
    spans.append((start, max(start, len(full.rstrip()))))
  enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  tokens = np.asarray(enc["input_ids"], np.int32)  # [n]
  offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)  # [n, 2]
  if loss_on_prompt:
    return {"tokens": tokens, "loss_mask": np.ones(len(tokens), bool)}
  mask = np.zeros(len(tokens), bool)
  nonempty = offsets[:, 1] > offsets[:, 0]
  for start, end in spans:
    mask |= nonempty & (offsets[:, 1] > start) & (offsets[:, 0] < end)
  return {"tokens": tokens, "loss_mask": mask}


def _turn_start(tokenizer, messages: list[dict], i: int, full: str) -> int | None:
  """Where assistant turn i's text starts in `full` (the rendering of messages[:i + 1])."""
  if i:
    prefix = _render(tokenizer, messages[:i], True)
    return len(prefix) if full.startswith(prefix) else None
  # A leading assistant turn: templates reject an empty conversation, so take the turn's text
  # after a probe user turn, and find it at the end of `full`.
  probe = [{"role": "user", "content": "?"}]
  prefix = _render(tokenizer, probe, True)
  turn = _render(tokenizer, probe + messages[:1], False)
  if not turn.startswith(prefix) or not full.endswith(turn[len(prefix):]):
    return None
  return len(full) - (len(turn) - len(prefix))


def _pc_example(tokenizer, prompt: str, completion: str, loss_on_prompt: bool,
                add_bos: bool | None) -> dict:
  bos = bos_ids(tokenizer, add_bos)
  if tokenizer.eos_token_id is None:
    raise DataError("the tokenizer has no eos token")
  p = bos + (_ids(tokenizer, prompt) if prompt else [])
  c = _ids(tokenizer, completion) + [tokenizer.eos_token_id]
  tokens = np.asarray(p + c, np.int32)  # [n]
  mask = np.concatenate([np.full(len(p), loss_on_prompt), np.ones(len(c), bool)])
  return {"tokens": tokens, "loss_mask": mask}


def tokenize_example(record: Mapping, tokenizer, format: str, *,
                     fields: Mapping[str, str] | None = None, loss_on_prompt: bool = False,
                     chat_template: bool = False, add_bos: bool | None = None) -> dict:
  """One record -> `{"tokens": int32 [n], "loss_mask": bool [n]}` (see the module docstring).

  Raises `DataError("field 'x' is missing")` etc. for a malformed record; the caller (usually
  `tokenize_records`) adds the file and row.
  """
  fields = dict(fields or {})
  try:
    if not isinstance(record, Mapping):
      raise _RowError("*", f"row should be an object, got {type(record).__name__}")
    if format == "chat":
      return _chat_example(tokenizer, _messages(record, fields), loss_on_prompt)
    if format == "text":
      text = _field(record, fields, "text")
      return _pc_example(tokenizer, "", text, True, add_bos)
    if format == "alpaca":
      instruction = _field(record, fields, "instruction")
      inp = _field(record, fields, "input", required=False, allow_empty=True)
      completion = _field(record, fields, "output")
      if chat_template:
        prompt = instruction + ("\n\n" + inp if inp.strip() else "")
      elif inp.strip():
        prompt = ALPACA_PROMPT.format(instruction=instruction, input=inp)
      else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    elif format == "prompt_completion":
      prompt = _field(record, fields, "prompt", allow_empty=True)
      completion = _field(record, fields, "completion")
    else:
      raise DataError(f"unknown data format {format!r} (use {', '.join(FORMATS)})")
    if chat_template:
      messages = [{"role": "user", "content": prompt},
                  {"role": "assistant", "content": completion}]
      return _chat_example(tokenizer, messages, loss_on_prompt)
    return _pc_example(tokenizer, prompt, completion, loss_on_prompt, add_bos)
  except _RowError as e:
    raise DataError(str(e) + _format_hint(record, format, fields, str(e))) from None


# The fields that say which layout a row has, in the order they are tried.
_SIGNATURES = (("chat", ("messages",)), ("prompt_completion", ("prompt", "completion")),
               ("alpaca", ("instruction", "output")), ("text", ("text",)))


def _format_hint(record: Any, format: str, fields: Mapping[str, str], problem: str) -> str:
  """`; the row has 'prompt' and 'completion': pass --config.data.format=prompt_completion`
  when a missing field is explained by the row being in another format's layout."""
  if not isinstance(record, Mapping) or not problem.endswith("is missing"):
    return ""
  if all(fields.get(k, k) in record for k in ("chosen", "rejected")):
    return ("; the row has 'chosen' and 'rejected': preference pairs train with "
            "experiments/dpo.py or experiments/reward.py")
  for fmt, keys in _SIGNATURES:
    names = [fields.get(k, k) for k in keys]
    if fmt != format and all(n in record for n in names):
      has = " and ".join(f"'{n}'" for n in names)
      return f"; the row has {has}: pass --config.data.format={fmt}"
  return ""


def check_tokenizer(tokenizer, format: str, chat_template: bool = False):
  """Config-level checks, raised at once rather than per row (so skip_malformed can't hide them)."""
  if format not in FORMATS:
    raise DataError(f"unknown data format {format!r} (use {', '.join(FORMATS)})")
  if format == "chat" or chat_template:
    if not getattr(tokenizer, "chat_template", None):
      raise DataError(f"format {format!r} needs the tokenizer's chat template, and it has none")
    if not getattr(tokenizer, "is_fast", False):
      raise DataError("chat formats need a fast tokenizer (for offset mappings)")
  elif tokenizer.eos_token_id is None:
    raise DataError(f"format {format!r} appends EOS, and the tokenizer has no eos token")


def fit(example: dict, seq_len: int, overflow: str) -> tuple[list[dict], str | None]:
  """Fit one example to rows of seq_len: (examples, what happened: None|truncated|dropped)."""
  tokens, mask = example["tokens"], example["loss_mask"]
  n_max = seq_len + 1  # n tokens make n - 1 (input, target) positions
  event = None
  if len(tokens) <= n_max:
    out = [example]
  elif overflow == "drop":
    return [], "dropped"
  elif overflow == "truncate":
    out, event = [{"tokens": tokens[:n_max], "loss_mask": mask[:n_max]}], "truncated"
  elif overflow == "split":
    starts = range(0, len(tokens) - 1, seq_len)
    out = [{"tokens": tokens[s:s + n_max], "loss_mask": mask[s:s + n_max]} for s in starts]
    event = "truncated"
  else:
    raise DataError(f"unknown overflow mode {overflow!r} (use {', '.join(OVERFLOW)})")
  out = [e for e in out if len(e["tokens"]) >= 2 and e["loss_mask"][1:].any()]
  return out, (event if out else "dropped")


def tokenize_records(records: Records | Sequence[Mapping], tokenizer, format: str, seq_len: int,
                     *, fields: Mapping[str, str] | None = None, overflow: str = "truncate",
                     skip_malformed: bool = False, loss_on_prompt: bool = False,
                     chat_template: bool = False, add_bos: bool | None = None,
                     ) -> tuple[list[dict], DataStats]:
  """Tokenize every record, fit it to seq_len, and count what happened.

  A malformed record raises `DataError("<file>: row <r>: field '<f>' ...")`, or with
  `skip_malformed=True` is counted in `stats.skipped` (the first few messages kept in
  `stats.errors`).
  """
  check_tokenizer(tokenizer, format, chat_template)
  if overflow not in OVERFLOW:
    raise DataError(f"unknown overflow mode {overflow!r} (use {', '.join(OVERFLOW)})")
  stats, examples = DataStats(), []
  make = lambda r: tokenize_example(r, tokenizer, format, fields=fields,
                                    loss_on_prompt=loss_on_prompt, chat_template=chat_template,
                                    add_bos=add_bos)
  for ex in each_record(records, make, skip_malformed, stats):
    fitted, event = fit(ex, seq_len, overflow)
    if event == "truncated":
      stats.truncated += 1
    elif event == "dropped":
      stats.dropped += 1
    examples.extend(fitted)
  stats.examples = len(examples)
  count_tokens(examples, stats)
  return examples, stats


def count_tokens(examples: Sequence[dict], stats: DataStats) -> DataStats:
  """Set stats.examples, tokens and target_tokens from `examples`."""
  stats.examples = len(examples)
  stats.tokens = int(sum(len(e["tokens"]) for e in examples))
  stats.target_tokens = int(sum(int(e["loss_mask"][1:].sum()) for e in examples))
  return stats


def each_record(records: Records | Sequence[Mapping], make: Callable[[Mapping], Any],
                skip_malformed: bool, stats: DataStats):
  """Yield make(record) for each record; a malformed one raises `DataError` naming its file and
  row, or with `skip_malformed` is counted in `stats.skipped` (first messages kept)."""
  if not isinstance(records, Records):
    records = Records("<records>", records)
  stats.records += len(records) + len(records.invalid)
  stats.skipped += len(records.invalid)  # unreadable rows `load_records` already left out
  stats.errors = (stats.errors + records.invalid)[:MAX_ERRORS]
  for i in range(len(records)):
    try:
      yield make(records[i])
    except DataError as e:
      msg = f"{records.where(i)}: {e}"
      if not skip_malformed:
        raise DataError(msg) from None
      stats.skipped += 1
      if len(stats.errors) < MAX_ERRORS:
        stats.errors.append(msg)


def collect_sources(data_config: Any, prepare: Callable, seed: int, noun: str = "examples"):
  """Load and prepare every source of `data_config`: hold out `eval_fraction` of each (by seed),
  add `eval_sources`, mix the train parts by weight.

  `prepare(source, records=None) -> (examples, DataStats)`.
  Returns (train_examples, eval_examples, train_stats, eval_stats).
  """
  sources = list(cfg_get(data_config, "sources", []))
  if not sources:
    raise DataError("data.sources is empty")
  eval_fraction = float(cfg_get(data_config, "eval_fraction", 0.0))
  if not 0.0 <= eval_fraction < 1.0:
    raise DataError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
  parts, stats, eval_examples, eval_stats = [], DataStats(), [], DataStats()
  for i, source in enumerate(sources):
    records = load_records(source, bool(cfg_get(source, "skip_malformed",
                                                cfg_get(data_config, "skip_malformed", False))))
    if eval_fraction > 0 and len(records) > 1:
      held, records = hold_out(records, eval_fraction, seed, i)
      ex, st = prepare(source, records=held)
      eval_examples += ex
      eval_stats += st
    ex, st = prepare(source, records=records)
    weight = float(cfg_get(source, "weight", 1.0))
    if not ex and weight > 0:
      raise DataError(f"data source {describe(source)}: no usable {noun} ({st})")
    parts.append((ex, weight))
    stats += st
  for source in cfg_get(data_config, "eval_sources", []):
    ex, st = prepare(source)
    eval_examples += ex
    eval_stats += st
  return mix(parts, seed), eval_examples, stats, eval_stats
