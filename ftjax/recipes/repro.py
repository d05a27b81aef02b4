"""Reproductions of published fine-tuning results at CPU scale, one command each.

  python experiments/repro.py --name=lora_rank     # Hu et al. 2021, table 6 style
  python experiments/repro.py --name=forgetting    # full FT at two lrs, LoRA, short, replay
  python experiments/repro.py --name=qlora         # Dettmers et al. 2023: NF4 / int4 vs fp32
  python experiments/repro.py --name=dpo_beta      # Rafailov et al. 2023, figure 2 (3 seeds)
  python experiments/repro.py --name=grpo_steps    # GRPO pass@1 vs steps; Yue et al. 2025
  python experiments/repro.py --name=qlora --base=/path/to/hf_dir --steps=300   # a real model

Each one: the base (without --base, the tiny demo base pretrained here on the first rows of the
retail text, configs/repro.py:stage=base), then its arms as sweep runs (ftjax/sweep.py: one
process and one workdir each, WORKDIR/<name>/<arm>; rerunning skips finished runs and resumes
the rest), measurements of every trained model (and of the base) in WORKDIR/<name>/<arm>/eval.json,
then ftjax/report.py's report.csv, report.md and curves.png, the study's own plot and a README
into `--out` (default docs/reproductions/<name>/). Everything is seeded (seed 0): the same
command gives the same table. Measurements: held-out support tickets (loss on the assistant
turns, and greedy replies scored by ftjax/tasks/support.py) and held-out general text (the retail
text rows the base never saw: perplexity, which forgetting raises).
dpo_beta and grpo_steps build their own start models, run 3 seeds and write their own README
with a verdict: ftjax/recipes/repro_rl.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Callable, Optional

from absl import logging
import numpy as np

from ftjax import (export, heldout, load_pretrained, partition, recipes, report, sweep,
                   workdir as wd)
from ftjax.tasks import support
from ftjax.errors import UserError
from ftjax.recipes import demo, repro_plots, repro_rl
from ftjax.tokenizer import load_tokenizer
from ftjax.train import setup, sft

SUPPORT_EVAL = os.path.join(support.DATA_DIR, "eval.jsonl")
TASK_KEYS = ("details", "invented", "escalation_ok", "voice")


@dataclasses.dataclass
class Context:
  workdir: str
  base: str  # HF dir of the base model
  general_eval: str  # held-out general text (jsonl, format text)
  steps: int = 0
  tickets: int = 24
  general: int = 200
  smoke: bool = False
  tiny: bool = True  # the base is the tiny demo base (no --base)


# ---------------------------------------------------------------- the base and the held-out text

def general_eval_file(workdir: str) -> str:
  """WORKDIR/general_eval.jsonl: the retail-text rows configs/repro.py keeps out of the base."""
  path = os.path.join(workdir, "general_eval.jsonl")
  if not os.path.exists(path):
    repro_config = recipes.config_module("repro")
    with open(repro_config.PRETRAIN) as f:
      rows = f.readlines()[repro_config.GENERAL_TRAIN:]
    with open(path + ".tmp", "w") as f:
      f.writelines(rows)
    os.replace(path + ".tmp", path)
  return path


def tiny_base(workdir: str, smoke: bool = False) -> str:
  """HF dir of the tiny demo base, pretrained once in WORKDIR/base (resumable)."""
  out = os.path.join(workdir, "base_hf" + ("_smoke" if smoke else ""))
  if os.path.exists(os.path.join(out, "config.json")):
    return out
  cfg = recipes.get_config("repro", "stage=base" + (",smoke" if smoke else ""))
  cfg.model.tokenizer = demo.train_tokenizer(os.path.join(workdir, "tokenizer"))
  pre = os.path.join(workdir, "base" + ("_smoke" if smoke else ""))
  logging.info("pretraining the tiny demo base in %s", pre)
  sft.run(cfg, pre)
  shutil.rmtree(out + ".tmp", ignore_errors=True)
  export.export(pre, out + ".tmp", "merged")
  os.replace(out + ".tmp", out)  # a killed export leaves no half base behind
  return out


# ---------------------------------------------------------------- arms: named sweep runs

def plan_arms(root: str, arms: list[tuple[str, str, dict]], fixed: list[str]) -> list[sweep.Run]:
  """One sweep run per arm (name, config arg, {key: value}) in ROOT/<name>, each checked by
  sweep.plan as a one-run sweep; ROOT/sweep.json lists them for report.py."""
  runs = []
  for name, config_arg, overrides in arms:
    (run,) = sweep.plan(config_arg, root, [(k, [str(v)]) for k, v in overrides.items()], fixed)
    workdir = os.path.join(root, name)
    command = [f"--workdir={workdir}" if a.startswith("--workdir=") else a for a in run.command]
    runs.append(sweep.Run(name, dict(overrides), workdir, command))
  keys = sorted({k for _, _, o in arms for k in o})
  sweeps = [(k, [str(o.get(k, "")) for _, _, o in arms]) for k in keys]
  sweep.write_definition(root, arms[0][1], sweeps, fixed, "arms", runs)
  return runs


def run_arms(root: str, arms, fixed) -> list[sweep.Run]:
  runs = plan_arms(root, arms, fixed)
  failed = sweep.run_all(runs, logging.info)
  if failed:
    raise UserError("; ".join(f"{r.workdir}: {line}" for r, line in failed))
  return runs


def fixed_overrides(ctx: Context, steps: Optional[int] = None) -> list[str]:
  out = [f"--config.model.hf_path={ctx.base}"]
  steps = steps or ctx.steps
  if steps:
    out += [f"--config.train.steps={steps}", f"--config.train.eval_every={steps}",
            f"--config.train.save_every={steps}"]
  return out


def sft_arg(ctx: Context, extra: str = "") -> str:
  return (recipes.config_file("repro") + ":stage=sft" + (",smoke" if ctx.smoke else "")
          + (f",{extra}" if extra else ""))


# ---------------------------------------------------------------- measurements

def measure(ctx: Context, loaded) -> dict:
  """Held-out support loss and task scores of greedy replies; held-out general-text loss."""
  task = heldout.evaluate(SUPPORT_EVAL, fmt="chat", task="support", seq_len=192,
                          batch_size=16, max_examples=ctx.tickets,
                          max_new_tokens=8 if ctx.smoke else 64, show=1, loaded=loaded)
  # With BOS, as the base was pretrained on this text (configs/repro.py, configs/demo.py).
  general = heldout.evaluate(ctx.general_eval, fmt="text", seq_len=128, batch_size=16,
                             max_examples=ctx.general, loaded=loaded, add_bos=True)
  scores = [task[k] for k in TASK_KEYS]
  # Same combination as support.true_reward: a score in [0, 1], higher is better.
  task_score = (np.nan_to_num(scores[0], nan=1.0) + 1 - scores[1] + scores[2] + scores[3]) / 4
  return {"task_loss": task["eval_loss"], **dict(zip(TASK_KEYS, scores)),
          "task_score": float(task_score), "general_loss": general["eval_loss"],
          "general_ppl": general["eval_ppl"], "example": task["samples"][0]["reply"]}


def measure_all(ctx: Context, root: str, runs: list[sweep.Run], with_base: bool = True):
  """eval.json in each run's workdir (and ROOT/base for the untrained base); a finished
  measurement newer than its run is kept."""
  todo = [("base", None)] if with_base else []
  todo += [(r.name, r.workdir) for r in runs]
  for name, workdir in todo:
    path = os.path.join(root, name, "eval.json")
    status = os.path.join(root, name, sweep.STATUS_FILE)
    if os.path.exists(path) and (not os.path.exists(status) or
                                 os.path.getmtime(path) > os.path.getmtime(status)):
      continue
    if workdir is None:
      model, params = load_pretrained(ctx.base)
      loaded, trainable = (model, params, load_tokenizer(ctx.base)), 0
    else:
      model, params, tok, config = wd.load_trained(workdir)
      labels = partition.label_params(params, setup.rules(config))
      loaded, trainable = (model, params, tok), partition.summary(params, labels)["trainable"]
    m = {**measure(ctx, loaded), "trainable_params": trainable}
    logging.info("%s: %s", name, m)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(m, f, indent=2)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- the studies

@dataclasses.dataclass
class Study:
  title: str
  mirrors: str  # the paper and figure
  what: str  # what is compared, one paragraph
  run: Callable[[Context], dict]  # -> {"root", "columns", "plots": {file: draw(rows, path)}}
  real: str  # the command's extra flags for a real model


def lora_rank(ctx: Context) -> dict:
  root = os.path.join(ctx.workdir, "lora_rank")
  ranks = (1, 4) if ctx.smoke else (1, 4, 16, 64)
  arms = [(f"rank={r}", sft_arg(ctx), {"adapter.rank": r, "adapter.alpha": 2 * r})
          for r in ranks]
  # Full fine-tuning at a full-FT learning rate (LoRA's 6e-3 would diverge).
  arms.append(("full", sft_arg(ctx), {"adapter.kind": "none", "optim.lr": "1e-3"}))
  runs = run_arms(root, arms[-2:] if ctx.smoke else arms, fixed_overrides(ctx))
  measure_all(ctx, root, runs)
  return {"root": root, "columns": ["trainable_params", "task_loss", "general_ppl",
                                    *TASK_KEYS, "task_score"],
          "plots": {"lora_rank.png": lambda rows, p: repro_plots.points(
              rows, "trainable_params", ["task_loss", "task_score"], p, logx=True,
              title="LoRA rank vs full fine-tuning (held-out support tickets)")}}


def forgetting(ctx: Context) -> dict:
  root = os.path.join(ctx.workdir, "forgetting")
  steps = ctx.steps or (3 if ctx.smoke else 40)
  full = {"adapter.kind": "none"}
  arms = [("full_lr=1e-3", sft_arg(ctx), {**full, "optim.lr": "1e-3"}),
          ("full_lr=1e-4", sft_arg(ctx), {**full, "optim.lr": "1e-4"}),
          ("lora", sft_arg(ctx), {}),
          ("full_short", sft_arg(ctx), {**full, "optim.lr": "1e-3",
                                        "train.steps": max(1, steps // 4)}),
          ("full_replay", sft_arg(ctx, "replay=1"), {**full, "optim.lr": "1e-3"})]
  if ctx.smoke:
    arms = [arms[0], arms[-1]]
  fixed = fixed_overrides(ctx, steps)
  # The short arm's own step count replaces the fixed one (a key is either swept or fixed).
  fixed = [f for f in fixed if not f.startswith("--config.train.steps=")]
  arms = [(n, a, {"train.steps": steps, **o}) for n, a, o in arms]
  runs = run_arms(root, arms, fixed)
  measure_all(ctx, root, runs)
  return {"root": root, "columns": ["trainable_params", "train.steps", "general_ppl",
                                    "task_loss", *TASK_KEYS, "task_score"],
          "plots": {"forgetting.png": lambda rows, p: repro_plots.points(
              rows, "general_ppl", ["task_score", "task_loss"], p,
              title="Task vs forgetting (held-out general text, before = base)")}}


def qlora(ctx: Context) -> dict:
  root = os.path.join(ctx.workdir, "qlora")
  kinds = ("none", "nf4") if ctx.smoke else ("none", "nf4", "int4")
  arms = [("fp32" if k == "none" else k, sft_arg(ctx), {"quant.kind": k}) for k in kinds]
  runs = run_arms(root, arms, fixed_overrides(ctx))
  measure_all(ctx, root, runs)
  return {"root": root, "columns": ["trainable_params", "task_loss", "task_loss_gap",
                                    "general_ppl", *TASK_KEYS, "task_score"],
          "gap": ("task_loss", "fp32"),
          "plots": {"qlora.png": lambda rows, p: repro_plots.bars(
              rows, "task_loss", p, title="Held-out support loss: 4-bit bases vs fp32, "
              "same LoRA adapters")}}


def dpo_beta(ctx: Context) -> dict:
  """Its own pipeline, seeds and README: ftjax/recipes/repro_rl.py (run() hands it over)."""
  return repro_rl.run("dpo_beta", ctx.workdir, None, None if ctx.tiny else ctx.base, ctx.steps,
                      ctx.smoke)


def grpo_steps(ctx: Context) -> dict:
  """Its own pipeline, seeds and README: ftjax/recipes/repro_rl.py (run() hands it over)."""
  return repro_rl.run("grpo_steps", ctx.workdir, None, None, ctx.steps, ctx.smoke)


STUDIES = {
    "lora_rank": Study(
        "LoRA rank ablation", "Hu et al. 2021 (LoRA), table 6: rank vs quality",
        "LoRA SFT of the demo base on the support tickets at ranks 1 to 64 (alpha = 2 rank), "
        "and full fine-tuning: held-out loss and task scores against trainable parameters.",
        lora_rank, "--steps=300"),
    "forgetting": Study(
        "Catastrophic forgetting and its mitigations",
        "the forgetting seeds: lower lr, LoRA, shorter training, replay of general text",
        "SFT of the demo base on the support tickets: full fine-tuning at lr 1e-3 and 1e-4, "
        "LoRA (rank 32), full fine-tuning for a quarter of the steps, and full fine-tuning with "
        "general text replayed (weight 1: half the mix). Task score against the perplexity of "
        "held-out general text the base was trained on (`base`: before SFT).",
        forgetting, "--steps=300"),
    "qlora": Study(
        "QLoRA vs LoRA quality", "Dettmers et al. 2023 (QLoRA), table 3: 4-bit base, same loss",
        "The same LoRA adapters (rank 32, seed 0) trained on a float32 base, an NF4 base and an "
        "int4 base (block 64, double quantization): held-out loss and its gap to float32.",
        qlora, "--steps=300"),
    "dpo_beta": Study(
        repro_rl.STUDIES["dpo_beta"]["title"], repro_rl.STUDIES["dpo_beta"]["mirrors"],
        repro_rl.STUDIES["dpo_beta"]["claim"], dpo_beta, repro_rl.STUDIES["dpo_beta"]["real"]),
    "grpo_steps": Study(
        repro_rl.STUDIES["grpo_steps"]["title"], repro_rl.STUDIES["grpo_steps"]["mirrors"],
        repro_rl.STUDIES["grpo_steps"]["claim"], grpo_steps,
        repro_rl.STUDIES["grpo_steps"]["real"]),
}


# ---------------------------------------------------------------- outputs

def add_gap(rows: list[dict], metric: str, ref: str):
  """`measured/<metric>_gap`: each row's metric minus the `ref` run's."""
  base = next((r for r in rows if r["run"] == ref), None)
  for r in rows:
    if base is not None and f"measured/{metric}" in r:
      r[f"measured/{metric}_gap"] = r[f"measured/{metric}"] - base[f"measured/{metric}"]


def table(rows: list[dict], columns: list[str]) -> str:
  cols = [c if "/" in c or c in rows[0] or "." in c else f"measured/{c}" for c in columns]
  lines = ["| run | " + " | ".join(c.removeprefix("measured/") for c in cols) + " |",
           "|---|" + "---:|" * len(cols)]
  for r in rows:
    cells = [_fmt(r.get(c, "")) for c in cols]
    lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{int(v):,}" if v.is_integer() and abs(v) >= 1000 else f"{v:.4g}"
  return str(v)


def run_seconds(root: str) -> float:
  """Seconds the runs under `root` took (sweep.py records them), whatever invocation ran them."""
  total = 0.0
  for d in sorted(os.listdir(root)):
    path = os.path.join(root, d, sweep.STATUS_FILE)
    if os.path.exists(path):
      with open(path) as f:
        total += float(json.load(f).get("seconds", 0.0))
  return total


def write_outputs(name: str, study: Study, result: dict, out: str, seconds: float,
                  ctx: Context) -> str:
  """report.csv / report.md / curves.png (report.py), the study's plot and README.md in `out`."""
  os.makedirs(out, exist_ok=True)
  rep = report.write_report(result["root"], out=out)
  if "metric" in rep:  # report.py's default plot against the first swept key: not the study's
    os.remove(rep["metric"])
  rows = rep["rows"]
  if "gap" in result:
    add_gap(rows, *result["gap"])
  for fname, draw in result["plots"].items():
    draw(rows, os.path.join(out, fname))
  pngs = [f for f in (*result["plots"], "frontier.png", "curves.png")
          if os.path.exists(os.path.join(out, f))]
  cmd = f"python experiments/repro.py --name={name}" + (" --smoke" if ctx.smoke else "")
  base_steps = recipes.get_config("repro", "stage=base" + (",smoke" if ctx.smoke else "")
                                  ).train.steps
  scale = ("the tiny demo base (configs/repro.py: 2 layers, d_model 128, pretrained "
           f"{base_steps} steps on the retail text)"
           if ctx.tiny else f"the base {ctx.base}")
  text = [f"# {study.title}", "", f"Mirrors: {study.mirrors}.", "", study.what, "",
          "## Command", "", f"    {cmd}", "",
          f"At CPU scale: {scale}; seed 0 everywhere; the training runs took {seconds:.0f} s "
          "in all on 2 shared CPU cores (their sweep_status.json). "
          f"Held-out: the first {ctx.tickets} support tickets of ftjax/demo/data/eval.jsonl "
          f"(greedy replies) and {ctx.general} rows of general text the base never saw.", "",
          "## Results", "", table(rows, result["columns"]), "",
          *[f"![{f}]({f})" for f in pngs], "",
          "report.csv has every logged metric of every run (`final/`, `best/`, `measured/`); "
          "curves.png the training loss of each run.", "",
          "## On a real model", "",
          f"    python experiments/repro.py --name={name} --base=/path/to/hf_model "
          f"{study.real} --workdir=/big/disk/repro --out=/tmp/{name}", "",
          "The same arms and measurements; `--base` replaces the tiny demo base (its own "
          "tokenizer is used) and `--steps` the CPU step count.", ""]
  path = os.path.join(out, "README.md")
  with open(path, "w") as f:
    f.write("\n".join(text))
  return path


def run(name: str, workdir: str, out: Optional[str] = None, base: Optional[str] = None,
        steps: int = 0, tickets: int = 24, general: int = 200, smoke: bool = False) -> dict:
  if name not in STUDIES:
    raise UserError(f"--name={name!r}: expected one of {', '.join(sorted(STUDIES))}")
  if name in repro_rl.STUDIES:  # their own start models, seeds and README (no tiny base)
    return repro_rl.run(name, workdir, out, base, steps, smoke)
  os.makedirs(workdir, exist_ok=True)
  ctx = Context(workdir, base or tiny_base(workdir, smoke), general_eval_file(workdir), steps,
                4 if smoke else tickets, 16 if smoke else general, smoke, base is None)
  result = STUDIES[name].run(ctx)
  out = out or os.path.join(recipes.REPO, "docs", "reproductions", name)
  readme = write_outputs(name, STUDIES[name], result, out, run_seconds(result["root"]), ctx)
  return {**result, "readme": readme, "out": out}

