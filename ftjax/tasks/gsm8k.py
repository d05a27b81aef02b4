"""GSM8K (`config.task = "gsm8k"`): grade-school math word problems with a `#### 42` answer.

Rows in GSM8K's layout (`question`, `answer` ending in `#### 42`) from `data.sources` and
`data.eval_sources` (the hub's openai/gsm8k, or local files in the same layout); each question
is asked as one chat user turn, so the model's chat template applies, and `answer` stays a
column for `rewards.answer_match`, which reads the number after its `####`.
"""

from __future__ import annotations

from typing import Optional

from ftjax.data import prompts as prompt_data, sources
from ftjax.errors import UserError

INSTRUCTION = ("Solve the problem step by step, then give the final answer as a number "
               "on the last line after '####'.")


def rows(source, where: Optional[str] = None) -> list[dict]:
  """GSM8K's layout as prompt rows: the question (and the instruction) as one chat user turn;
  `answer` stays a column."""
  where = where or sources.describe(source)
  out = []
  records = sources.load_records(source)
  for i, r in enumerate(records):
    r = sources.to_python(r)
    for field in ("question", "answer"):
      if not isinstance(r.get(field), str) or not r[field].strip():
        raise UserError(f"{where}: row {records.row(i)}: field {field!r} is missing or empty "
                        "(GSM8K layout: question, answer)")
    out.append({"prompt": [{"role": "user",
                            "content": f"{r['question'].strip()}\n\n{INSTRUCTION}"}],
                "answer": r["answer"]})
  return prompt_data.check_rows(out, where)


def prompt_rows(config) -> tuple[list[dict], list[dict]]:
  """(train rows, eval rows) of `data.sources` and `data.eval_sources`, the eval rows cut to
  `data.eval_rows` (0: all)."""
  d = config.data
  train = [r for s in d.sources for r in rows(s)]
  ev = [r for s in d.eval_sources for r in rows(s)]
  return train, ev[:int(d.eval_rows)] if d.eval_rows else ev
