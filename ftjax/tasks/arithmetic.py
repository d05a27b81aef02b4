"""Arithmetic: a verifiable task small enough to learn on CPU (`config.task = "arithmetic"`).

Addition problems `{"prompt": "12+34=", "answer": "46"}`, held-out operand pairs only in the
eval split; and step-by-step column-addition solutions with step labels (`solve`, `prm_rows`:
TRL's PRM layout, single planted errors) for process reward models.
Without `model.hf_path` the task also brings its model: a small BPE tokenizer
trained into the workdir and, with `grpo.warm_start_steps` > 0, an SFT warm start on solved
train problems (a model from scratch never writes a right answer, so RL has nothing to
reinforce), a fraction `grpo.warm_start_carry_drop` of them from a sloppy teacher that drops
every carry.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import ml_collections
import numpy as np
from absl import logging

from ftjax import tokenizer as tokenizer_lib


def prompt(a: int, b: int) -> str:
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


def rows(split: str, n: int, seed: int = 0, max_operand: int = 99,
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
  out = []
  while len(out) < n:
    a, b = (int(x) for x in rng.integers(0, max_operand + 1, 2))
    if held_out[a, b] == (split == "eval"):
      answer = sum_without_carries(a, b) if sloppy[len(out)] else a + b
      out.append({"prompt": prompt(a, b), "answer": str(answer)})
  return out


def texts(n: int = 2000, seed: int = 0) -> list[str]:
  """Solved problems, e.g. to train a tokenizer or an SFT warm start."""
  return [r["prompt"] + r["answer"] for r in rows("train", n, seed)]


def prompt_rows(config) -> tuple[list[dict], list[dict]]:
  """(train rows, eval rows): `data.train_rows` and `data.eval_rows` problems."""
  seed = int(config.train.seed)
  return (rows("train", int(config.data.train_rows), seed),
          rows("eval", int(config.data.eval_rows), seed))


def prepare(config, workdir: str, sft: Callable, export: Callable) -> Optional[Callable]:
  """Without `model.hf_path`: sets `model.tokenizer` to WORKDIR/tokenizer and, with
  `grpo.warm_start_steps` > 0, `model.hf_path` to WORKDIR/sft_hf (the SFT model's export);
  both before the resume check, which compares the config with the saved one holding those
  paths. Returns what writes them (once: a resume finds them), or None."""
  tok_path = _tokenizer_path(config, workdir)
  sft_dir = _warm_start_dir(config, workdir)
  if tok_path is None and sft_dir is None:
    return None

  def build():
    if tok_path and not os.path.exists(os.path.join(tok_path, "tokenizer.json")):
      # With BOS from its post-processor: the warm start's rows and GRPO's string prompts
      # start with BOS (as the task's models and its published figures always had them).
      tokenizer_lib.train_bpe_tokenizer(texts(), 300, tok_path, add_bos=True)
    _warm_start(config, sft_dir, sft, export)
  return build


def _tokenizer_path(config, workdir) -> Optional[str]:
  if config.model.hf_path or (
      config.model.tokenizer and config.model.tokenizer != os.path.join(workdir, "tokenizer")):
    return None
  config.model.tokenizer = os.path.join(workdir, "tokenizer")
  return config.model.tokenizer


def _warm_start_dir(config, workdir) -> Optional[str]:
  if config.model.hf_path or not int(config.grpo.warm_start_steps):
    return None
  config.model.hf_path = os.path.join(workdir, "sft_hf")
  return os.path.join(workdir, "sft")


def _warm_start(config, sft_dir: Optional[str], sft: Callable, export: Callable):
  """The SFT stage: full fine-tuning of the `model.preset` shape on solved train problems
  (held-out pairs never appear), resumable, exported once."""
  if sft_dir is None or os.path.exists(os.path.join(config.model.hf_path, "config.json")):
    return
  os.makedirs(sft_dir, exist_ok=True)
  data_path = os.path.join(sft_dir, "problems.jsonl")
  with open(data_path, "w") as f:
    for r in rows("train", int(config.grpo.warm_start_rows), int(config.train.seed),
                  carry_drop=float(config.grpo.warm_start_carry_drop)):
      f.write(json.dumps({"prompt": r["prompt"], "completion": r["answer"]}) + "\n")
  c = warm_start_config(config, data_path)
  logging.info("task=arithmetic: SFT warm start, %d steps, into %s", c.train.steps, sft_dir)
  sft(c, sft_dir)
  export(sft_dir, config.model.hf_path)


def warm_start_config(config, data_path: str) -> ml_collections.ConfigDict:
  """The warm start's SFT config: configs/sft.py's `model=PRESET,adapter=none,
  format=prompt_completion` (written out here: the package does not import configs/; a test
  holds the two equal) with the warm start's data, steps and optimizer."""
  g, t = config.grpo, config.train
  c = ml_collections.ConfigDict()
  c.model = dict(hf_path="", preset=config.model.preset, tokenizer=config.model.tokenizer,
                 dtype="float32", compute_dtype="", attention="xla", remat="none",
                 seed=int(config.model.seed), head="lm", matmul_precision="auto")
  c.adapter = dict(kind="none", rank=8, alpha=16.0, dropout=0.0, targets="all-linear",
                   rslora=False, dora=False, init="kaiming", length=16, reparam=False,
                   reparam_hidden=512, reduction_factor=16, placement="houlsby",
                   train_extra="", dtype="float32")
  c.quant = dict(kind="none", block_size=64, double_quant=True)
  c.data = dict(path=data_path, sources=[], format="prompt_completion", fields={}, packing=True,
                overflow="truncate", skip_malformed=False, loss_on_prompt=False,
                chat_template=False, eval_path="", eval_fraction=0.0, seed=0, cache_dir="none")
  c.optim = dict(name="adamw", lr=float(g.warm_start_lr), schedule="cosine", warmup_steps=20,
                 min_lr_ratio=0.1, weight_decay=0.0, clip=1.0, b1=0.9, b2=0.999, eps=1e-8)
  c.train = dict(steps=int(g.warm_start_steps), batch_size=32, seq_len=64, grad_accum=1,
                 seed=int(t.seed), log_every=50, eval_every=10 ** 9, save_every=10 ** 9, keep=2,
                 eval_batches=0, early_stop_patience=0, async_save=True, logprob_chunk=256,
                 offload="none")
  c.parallel = config.parallel
  c.mesh = dict(shape=config.mesh.shape, rules={}, distributed=False)
  c.allow_drift = False
  return c


# ---------------------------------------------------------------------------- step-by-step
# Column addition written one step per digit, for process reward models (TRL's PRM layout):
#
#   37+48=  ->  ["7+8+0=15 write 5 carry 1", "3+4+1=08 write 8 carry 0", "answer 85"]
#
# A step states the column's digits and incoming carry, their sum (two digits: the carry out
# and the digit written, each in its place), the digit written and the carry out; the last
# step reads the answer off the written digits. Every step can be checked on its own line
# except what it inherits (its carry in, the answer's digits), so a verifier has to read
# earlier steps too. From the first bad step on, every step is labelled bad (PRM800K).

# A dropped carry (carry 0 out of a sum >= 10), a wrong digit written (the sum's last digit
# miscopied), a wrong sum (the column added wrong: only an addition table tells).
ERROR_KINDS = ("carry", "digit", "sum")


def _digits(n: int) -> list[int]:
  return [int(c) for c in reversed(str(n))]


def solve(a: int, b: int, error_at: Optional[int] = None, kind: str = "carry",
          rng: Optional[np.random.Generator] = None) -> tuple[list[str], list[bool]]:
  """(steps, labels) of a + b by columns, with one error planted at column `error_at` (None: a
  correct solution).

  kind "carry": the column's carry is dropped (written as 0; only where the sum is >= 10,
  otherwise it falls back to "digit"). kind "digit": the digit written is off by 1..9 (from
  `rng`, else +1) from the sum's last digit. kind "sum": the column's sum is off by 1..9, and
  its digit and carry follow it. Later steps work on from the wrong state, and every step from
  the first bad one on is labelled False, as in PRM800K. The answer step is the last step.
  """
  da, db = _digits(a), _digits(b)
  width = max(len(da), len(db))
  da, db = da + [0] * (width - len(da)), db + [0] * (width - len(db))
  steps, labels, written, carry, ok = [], [], [], 0, True
  for i in range(width):
    total = da[i] + db[i] + carry
    digit, out = total % 10, total // 10
    if i == error_at:
      if kind not in ERROR_KINDS:
        raise ValueError(f"error kind {kind!r}: expected one of {ERROR_KINDS}")
      delta = int(rng.integers(1, 10)) if rng is not None else 1
      if kind == "carry" and out:
        out = 0
      elif kind == "sum":
        # 19 (9 + 9 + 1) is the largest true column sum: stay within 0..19
        total = total + delta if total + delta <= 19 else total - delta
        digit, out = total % 10, total // 10
      else:
        digit = (digit + delta) % 10
      ok = False
    steps.append(f"{da[i]}+{db[i]}+{carry}={total:02d} write {digit} carry {out}")
    labels.append(ok)
    written.append(digit)
    carry = out
  if carry:
    written.append(carry)
  answer = int("".join(str(d) for d in reversed(written)))
  steps.append(f"answer {answer}")
  labels.append(ok)
  return steps, labels


def step_answer(steps: list[str]) -> Optional[int]:
  """The answer a step-by-step solution ends with (None when its last step has none)."""
  last = steps[-1] if steps else ""
  try:
    return int(last.split("answer ", 1)[1]) if last.startswith("answer ") else None
  except ValueError:
    return None


def prm_rows(split: str, n: int, seed: int = 0, max_operand: int = 999,
             error_fraction: float = 0.5, kinds: Sequence[str] = ("carry", "digit")
             ) -> list[dict]:
  """Step-labelled solutions in TRL's PRM layout `{"prompt", "completions", "labels"}`: a
  fraction `error_fraction` of them drawn to get one planted error of one of `kinds`
  (ERROR_KINDS): a dropped carry in a random carrying column (none when the problem has no
  carry), a wrong digit or a wrong sum in a random column. Held-out operand pairs only in "eval"
  (as `rows`). Seeded: the same (split, n, seed) gives the same rows."""
  rng = np.random.default_rng([seed, 3, 0 if split == "train" else 1])
  out = []
  for r in rows(split, n, seed, max_operand):
    a, b = (int(x) for x in r["prompt"][:-1].split("+"))
    error_at, kind = None, "carry"
    if rng.random() < error_fraction:
      kind = kinds[int(rng.integers(0, len(kinds)))]
      error_at = _error_column(a, b, kind, rng)
    steps, labels = solve(a, b, error_at, kind, rng)
    out.append({"prompt": r["prompt"], "completions": steps, "labels": labels})
  return out


def carry_columns(a: int, b: int) -> list[int]:
  """The columns (0 = units) whose sum carries."""
  out, carry, i = [], 0, 0
  while a or b or carry:
    carry = (a % 10 + b % 10 + carry) // 10
    if carry:
      out.append(i)
    a, b, i = a // 10, b // 10, i + 1
  return out


def _error_column(a: int, b: int, kind: str, rng: np.random.Generator) -> Optional[int]:
  """Where an error of `kind` goes: a dropped carry in a column that carries (None, no error,
  when none does: there is no carry to drop), a wrong digit or sum in any column."""
  cols = carry_columns(a, b) if kind == "carry" else range(max(len(str(a)), len(str(b))))
  return int(cols[int(rng.integers(0, len(cols)))]) if len(cols) else None


def sample_solutions(a: int, b: int, k: int, rng: np.random.Generator,
                     step_error: float = 0.15, kinds: Sequence[str] = ("carry", "digit")
                     ) -> list[tuple[list[str], list[bool]]]:
  """k sampled solutions of a + b from a noisy solver: each column independently goes wrong
  with probability `step_error` (the first slip is planted, of one of `kinds`; later columns
  work on from it), as candidates for best-of-N selection."""
  width = max(len(str(a)), len(str(b)))
  out = []
  for _ in range(k):
    slips = [i for i in range(width) if rng.random() < step_error]
    if slips:
      kind = kinds[int(rng.integers(0, len(kinds)))]
      # a dropped carry needs a carry: the first carrying column from the slip on (none left:
      # no carry to drop, the solution stays right)
      at = next((c for c in carry_columns(a, b) if c >= slips[0]), None) \
          if kind == "carry" else slips[0]
      out.append(solve(a, b, at, kind, rng))
    else:
      out.append(solve(a, b))
  return out


def prm_texts(n: int = 1000, seed: int = 0) -> list[str]:
  """Step-by-step solutions as text, e.g. to train a tokenizer for a process reward model."""
  return [r["prompt"] + "\n".join(r["completions"]) for r in prm_rows("train", n, seed)]
