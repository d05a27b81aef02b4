"""Process reward model: a step classifier on TRL's PRM rows (prompt, completions, labels).

  python experiments/prm.py --config=configs/prm.py:task=arithmetic --workdir=/tmp/prm
  python experiments/prm.py --config=configs/prm.py --workdir=/tmp/prm \
      --config.model.hf_path=/path/to/hf_dir --config.data.path=steps.jsonl
  python experiments/export.py --workdir=/tmp/prm --out=/tmp/prm_hf   # *ForTokenClassification

Rows: `{"prompt": str, "completions": [step, ...], "labels": [bool, ...]}` (TRL v0.19's
PRMTrainer layout; `data.fields` renames them). Steps are joined by `data.step_separator`; each
step's label sits on its separator's last token, the rest is ignored. A 2-class token head
(`model.head=token`: 0 bad, 1 good) on the decoder; logged are step accuracy and F1 on the bad
steps. `task=arithmetic` generates column-addition solutions with planted errors (a dropped
carry, a wrong digit; `prm.error_fraction` of the rows) and, without `model.hf_path`, a small
tokenizer and a `model=` preset trained from scratch. `prm.train_on_last_step_only` (TRL's
option): only each train row's last label, i.e. an outcome reward model on the same solutions.
The arg takes the keys of configs/sft.py (model=, adapter=, quant=, smoke) plus
`task=arithmetic`. Print the resolved config with --print_config.
"""

from configs import common
from ftjax.errors import UserError

ARG_KEYS = common.ARG_KEYS + ("task",)


def get_config(arg=None):
  a = common.parse_arg(arg, ARG_KEYS, "configs/prm.py")
  task = a.get("task", "")
  if task not in ("", "arithmetic"):
    raise UserError(f"configs/prm.py: task={task!r}: expected arithmetic (or no task= and "
                    "--config.data.path=FILE)")
  data = dict(path="", sources=[], eval_path="", eval_sources=[], eval_fraction=0.0, fields={},
              step_separator="\n", skip_malformed=False, seed=0, cache_dir="none")
  c = common.base(a, data)
  c.model.head = "token"
  # The step classifier is new: it trains beside the adapter (PEFT's modules_to_save).
  c.adapter.train_extra = "^token_score$"
  c.prm = dict(task=task, train_on_last_step_only=False, train_rows=4000, eval_rows=400,
               max_operand=999, error_fraction=0.5, error_kinds="carry,digit")
  c.optim.update(lr=1e-3 if c.adapter.kind != "none" else 1e-5, warmup_steps=10)
  c.train.update(steps=300, batch_size=16, seq_len=256, eval_every=100, save_every=100)
  if task == "arithmetic" and "adapter" not in a:
    # From scratch on the task's own tokenizer: the whole model trains.
    c.adapter.kind = "none"
    c.optim.update(lr=3e-3, warmup_steps=20)
    c.train.update(steps=400, batch_size=32, seq_len=64)
  if a.get("smoke"):
    c.train.update(steps=4, batch_size=4, seq_len=64, eval_every=2, save_every=2)
  return c
