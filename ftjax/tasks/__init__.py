"""Tasks: the built-in problems ftjax trains and measures on, one module each.

A config names its task (`config.task`: "" for the user's own data); `get(name)` imports
`ftjax.tasks.<name>`, as big_vision looks up its modules by name, and only this package knows a
task by its name. A task module defines what it has, all optional:

  prompt_rows(config) -> (train rows, eval rows)   prompt-only rows (TRL's layout) for RL
  prepare(config, workdir, sft, export) -> fn|None  sets the config paths the task writes into
                                       the workdir (before the resume check compares configs)
                                       and returns what writes them, run once the run holds
                                       the workdir; `sft(config, workdir)` trains and
                                       `export(workdir, out)` exports a merged model
  REWARDS: {name: factory}             rewards a config names in `grpo.rewards`
  score_reply(reply, example) -> dict  checks of one reply, each a float (NaN: not scored)
  summarize(scores) -> dict            their means
  LOWER_BETTER, HIGHER_BETTER          which way `score_reply`'s metrics are better (reports)
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

from ftjax.data import prompts as prompt_data
from ftjax.errors import UserError

NAMES = ("support", "support_safety", "arithmetic", "gsm8k")


def get(name: str) -> Optional[ModuleType]:
  """The task module called `name`, or None for "" (no task: the config's own data)."""
  if not name:
    return None
  if name not in NAMES:
    raise UserError(f"config.task={name!r}: expected one of {', '.join(NAMES)} (or \"\")")
  return importlib.import_module(f"{__name__}.{name}")


def of(config) -> Optional[ModuleType]:
  """The task `config.task` names (None when it names none or has no `task` key)."""
  return get(config.get("task", "") or "")


def named_rewards() -> dict:
  """Every task's named rewards: a config may use one whatever its task (the support scorer
  on the user's own copy of the demo's rows)."""
  out = {}
  for name in NAMES:
    out.update(getattr(get(name), "REWARDS", {}))
  return out


def reply_scorers() -> dict:
  """{task name: its `score_reply`} of the tasks that score replies."""
  return {n: get(n).score_reply for n in NAMES if hasattr(get(n), "score_reply")}


def metric_directions() -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(lower is better, higher is better): every task's metric names."""
  lower, higher = (), ()
  for name in NAMES:
    task = get(name)
    lower += tuple(getattr(task, "LOWER_BETTER", ()))
    higher += tuple(getattr(task, "HIGHER_BETTER", ()))
  return lower, higher


def prompt_rows(config) -> tuple[list[dict], list[dict]]:
  """(train rows, eval rows) for online RL: the task's, or those of `data.path` /
  `data.sources` and `data.eval_path`, cut to `data.eval_rows` (0: all)."""
  task = of(config)
  if task is not None and hasattr(task, "prompt_rows"):
    return task.prompt_rows(config)
  d = config.data
  srcs = list(d.sources) or [{"path": p} for p in d.path.split(",") if p]
  if not srcs:
    raise UserError("config.data.path (a prompt file or a hub source: rows with a 'prompt' "
                    f"column) is required, or a config.task ({', '.join(NAMES)})")
  train = [r for s in srcs for r in prompt_data.load_rows(s)]
  ev = [r for p in d.eval_path.split(",") if p for r in prompt_data.load_rows({"path": p})]
  return train, ev[:int(d.eval_rows)] if d.eval_rows else ev
