"""Reproductions of published fine-tuning results at CPU scale, one command each.

  python experiments/repro.py --name=lora_rank     # Hu et al. 2021, table 6 style (+ other PEFT)
  python experiments/repro.py --name=forgetting    # full FT at two lrs, LoRA, replay
  python experiments/repro.py --name=qlora         # Dettmers et al. 2023: NF4 / int4 vs fp32
  python experiments/repro.py --name=dpo_beta      # Rafailov et al. 2023, figure 2 (3 seeds)
  python experiments/repro.py --name=grpo_steps    # GRPO pass@1 vs steps; Yue et al. 2025
  python experiments/repro.py --name=qlora --base=/path/to/hf_dir --steps=300   # a real model

Each one: the base (without --base, the session-7 demo base ftjax/demo/base_v1: the 0.5M llama
that `experiments/demo.py --pretrain` made then, with its tokenizer), then its arms as sweep runs
(ftjax/sweep.py: one process and one workdir each, WORKDIR/<name>/<arm>,seed=<s>; rerunning
skips finished runs and resumes the rest), every arm on `--seeds` seeds (train.seed =
model.seed = data.seed), measurements of every trained model (and of the base) in its
eval.json, then ftjax/report.py's report.csv, report.md and curves.png, the study's own plot
(means with 95% t intervals over seeds) and a README with the claim, the per-arm table and the
verdict computed from the intervals (ftjax/recipes/repro_verdict.py) into `--out` (default
docs/reproductions/<name>/). The same command gives the same table on the same machine.
Measurements: held-out support tickets (loss on the assistant turns, and greedy replies scored
by ftjax/tasks/support.py: counts pooled over seeds with 95% Wilson intervals) and held-out
general text: retail documents from the generator of the base's pretraining corpus
(support.make_pretraining_text) at a seed the base never used, minus any document that is in
the base's corpus verbatim (perplexity, which forgetting raises).
The sweep processes share a persistent JAX compilation cache (WORKDIR/jax_cache, unless
JAX_COMPILATION_CACHE_DIR is set): the seeds of an arm compile its steps once.
dpo_beta and grpo_steps build their own start models, run 3 seeds and write their own README
with a verdict: ftjax/recipes/repro_rl.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Callable, Optional

from absl import logging
import numpy as np

from ftjax import (export, heldout, load_pretrained, partition, recipes, report, sweep,
                   workdir as wd)
from ftjax.tasks import support
from ftjax.errors import UserError
from ftjax.recipes import demo, repro_rl, repro_verdict as rv
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
  tiny: bool = True  # the base is the default base (no --base): the shipped demo base
  seeds: int = 1  # seeds per arm (the seeded studies)
  replay: str = ""  # general text to replay (forgetting): the base's own pretraining documents


# ---------------------------------------------------------------- the base and the held-out text

# Held-out general text: documents of make_pretraining_text, the generator of the shipped base's
# corpus (support.make_base_corpus(170000, seed 0) used its seed 1000), at seed 1100, which no
# base recipe uses; the plain retail documents only (no support threads: those are the SFT
# task's own kind of text), and none that occurs verbatim in the base's corpus (the FAQ lines
# and some product pages do).
GENERAL_SEED, GENERAL_ROWS = 1100, 1000
REPLAY_ROWS = 4000  # the first documents of the base's own corpus, replayed by `forgetting`


def general_eval_file(workdir: str, exclude_base_corpus: bool = True) -> str:
  """WORKDIR/general_heldout.jsonl: general text of the demo base's kind that it never saw.
  Without `exclude_base_corpus` (another base, which never saw the demo corpus), the same
  generator without the check against the demo base's corpus (14 s saved):
  WORKDIR/general_heldout_any.jsonl."""
  path = os.path.join(workdir, "general_heldout" + ("" if exclude_base_corpus else "_any")
                      + ".jsonl")
  if not os.path.exists(path):
    seen = ({d["text"] for d in support.make_base_corpus(support.BASE_CORPUS["n"], 0)}
            if exclude_base_corpus else set())
    docs = [d for d in support.make_pretraining_text(2 * GENERAL_ROWS, GENERAL_SEED)
            if d["text"] not in seen][:GENERAL_ROWS]
    support.write_jsonl(path + ".tmp", docs)
    os.replace(path + ".tmp", path)
  return path


def replay_file(workdir: str) -> str:
  """WORKDIR/replay_general.jsonl: the first documents of the shipped base's own pretraining
  corpus (support.make_base_corpus, seed 0), what replay mixes back into SFT."""
  path = os.path.join(workdir, "replay_general.jsonl")
  if not os.path.exists(path):
    support.write_jsonl(path + ".tmp", support.make_base_corpus(REPLAY_ROWS, 0))
    os.replace(path + ".tmp", path)
  return path


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def tiny_base(workdir: str, smoke: bool = False) -> str:
  """HF dir of the old tiny demo base (configs/repro.py:stage=base), pretrained once in
  WORKDIR/base (resumable). No longer the default (the shipped demo base is)."""
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

SEED_KEYS = ("train.seed", "model.seed", "data.seed")


def plan_arms(root: str, arms: list[tuple[str, str, dict]], fixed: list[str],
              seeds: int = 0) -> list[sweep.Run]:
  """One sweep run per arm (name, config arg, {key: value}) in ROOT/<name>, each checked by
  sweep.plan as a one-run sweep; ROOT/sweep.json lists them for report.py. With `seeds`, each
  arm once per seed s in 0..seeds-1, in ROOT/<name>,seed=<s>, with every seed key set to s
  (report.py groups runs that differ only in those)."""
  if seeds:
    arms = [(f"{name}{rv.SEED_SEP}{s}", arg, {**o, **{k: s for k in SEED_KEYS}})
            for name, arg, o in arms for s in range(int(seeds))]
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


def run_arms(root: str, arms, fixed, seeds: int = 0) -> list[sweep.Run]:
  runs = plan_arms(root, arms, fixed, seeds)
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
  # All tickets in one batch (up to the 120 shipped): greedy decoding of a model this small
  # costs per step, not per row (demo.evaluate's reason).
  task = heldout.evaluate(SUPPORT_EVAL, fmt="chat", task="support", seq_len=192,
                          batch_size=max(1, min(ctx.tickets, demo.EVAL_TICKETS)),
                          max_examples=ctx.tickets, max_new_tokens=8 if ctx.smoke else 64,
                          show=1, loaded=loaded)
  # With BOS, as the base was pretrained on this text (configs/repro.py, configs/demo.py).
  general = heldout.evaluate(ctx.general_eval, fmt="text", seq_len=128, batch_size=50,
                             max_examples=ctx.general, loaded=loaded, add_bos=True)
  scores = [task[k] for k in TASK_KEYS]
  # Same combination as support.true_reward: a score in [0, 1], higher is better.
  task_score = (np.nan_to_num(scores[0], nan=1.0) + 1 - scores[1] + scores[2] + scores[3]) / 4
  return {"task_loss": task["eval_loss"], **dict(zip(TASK_KEYS, scores)),
          "task_score": float(task_score), "general_loss": general["eval_loss"],
          "general_ppl": general["eval_ppl"], "example": task["samples"][0]["reply"],
          # the counts behind each rate: report.py and the tables pool them over seeds
          **{f"{k}_{c}": task[f"{k}_{c}"] for k in TASK_KEYS for c in "kn"
             if f"{k}_{c}" in task}}


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
  # The seeded studies: the paper's claim as one testable sentence (the parts that decide it:
  # the study's result["parts"]), and their defaults for --tickets and --seeds.
  claim: str = ""
  tickets: int = 24
  seeds: int = 1


def _seeded(ctx: Context, root: str, arms: list, fixed: list[str]) -> dict:
  """Train every arm on every seed (ROOT/<arm>,seed=<s>), measure each model and the base;
  {arm: {seed: eval.json}} (the base: {-1: ...})."""
  # No held-out loss during training: measure_all measures every model once it is done, and the
  # eval step's compile and passes were a tenth of a short arm's time.
  runs = run_arms(root, arms, [*fixed, "--config.data.eval_path="], seeds=ctx.seeds)
  measure_all(ctx, root, runs)
  evals = {}
  for name in ["base", *(r.name for r in runs)]:
    with open(os.path.join(root, name, "eval.json")) as f:
      evals[name] = json.load(f)
  return rv.by_arm(evals)


def _params(arm: str, seeds: dict) -> str:
  return f"{int(next(iter(seeds.values()))['trainable_params']):,}"


# The margins of the verdicts. Task score: the mean of the four task rates (each a proportion of
# 120 tickets), so 0.02 is two points, about what one ticket in each of the four checks moves.
# Held-out loss (nats per assistant token, ~0.2 after SFT): 0.01 is 5% of it.
SCORE_MARGIN = 0.02
LOSS_MARGIN = 0.01


def lora_rank(ctx: Context) -> dict:
  root = os.path.join(ctx.workdir, "lora_rank")
  arms = [(f"rank={r}", sft_arg(ctx), {"adapter.rank": r, "adapter.alpha": 2 * r})
          for r in (1, 4, 8, 64)]
  # Full fine-tuning at a full-FT learning rate (LoRA's 6e-3 would diverge).
  arms.append(("full", sft_arg(ctx), {"adapter.kind": "none", "optim.lr": "1e-3"}))
  # The other PEFT methods as rows (issue 21), at their own defaults.
  arms += [("prefix", sft_arg(ctx), {"adapter.kind": "prefix", "adapter.length": 16}),
           # the soft prompt precedes each row, so rows are not packed
           ("prompt", sft_arg(ctx), {"adapter.kind": "prompt", "adapter.length": 16,
                                     "data.packing": False}),
           ("bottleneck", sft_arg(ctx), {"adapter.kind": "bottleneck",
                                         "adapter.reduction_factor": 16,
                                         "adapter.placement": "houlsby"})]
  if ctx.smoke:  # one arm: the bottleneck row (the rank and full-FT paths: the qlora smoke)
    arms = [a for a in arms if a[0] == "bottleneck"]
  arms_seen = _seeded(ctx, root, arms, fixed_overrides(ctx))
  order = ["base", *(a for a, _, _ in arms)]
  lo_r = "rank=1"
  parts = [] if ctx.smoke else [
      rv.Part("rank 4 is no worse than rank 64 by more than the margin", "task_score",
              (("rank=4", 1), ("rank=64", -1)), "noninferior", SCORE_MARGIN),
      rv.Part("rank 8 is no worse than rank 64 by more than the margin", "task_score",
              (("rank=8", 1), ("rank=64", -1)), "noninferior", SCORE_MARGIN),
      # three doublings each side of rank 8: the gain below it exceeds the gain above it
      rv.Part("diminishing returns: the gain from rank 1 to 8 exceeds the gain from 8 to 64",
              "task_score", (("rank=8", 2), (lo_r, -1), ("rank=64", -1)), "greater", 0.0)]
  return {"root": root, "arms": arms_seen, "order": order, "parts": parts,
          "means": ["task_score", "task_loss", "general_ppl"],
          "extra": {"trainable params": _params},
          "plots": {"lora_rank.png": lambda a, p: rv.errorbars(
              a, order, "trainable_params", ["task_score", "task_loss"], p, logx=True,
              title="Trainable parameters vs the task (held-out support tickets)")}}


def forgetting(ctx: Context) -> dict:
  root = os.path.join(ctx.workdir, "forgetting")
  full = {"adapter.kind": "none"}
  replay = sft_arg(ctx, "replay=1" + (f",replay_from={ctx.replay}" if ctx.replay else ""))
  arms = [("full_lr=1e-3", sft_arg(ctx), {**full, "optim.lr": "1e-3"}),
          ("full_lr=1e-4", sft_arg(ctx), {**full, "optim.lr": "1e-4"}),
          ("lora", sft_arg(ctx), {}),
          ("full_replay", replay, {**full, "optim.lr": "1e-3"}),
          # Not in the claim: LoRA at a tenth of its lr, to tell LoRA from its lr.
          ("lora_lr=6e-4", sft_arg(ctx), {"optim.lr": "6e-4"})]
  if ctx.smoke:  # the replay arm alone: full FT with the replayed text in its data
    arms = [arms[3]]
  arms_seen = _seeded(ctx, root, arms, fixed_overrides(ctx))
  for seeds in arms_seen.values():  # the rise over the base's perplexity
    for m in seeds.values():
      m["general_ppl_rise"] = m["general_ppl"] - arms_seen["base"][-1]["general_ppl"]
  order = ["base", *(a for a, _, _ in arms)]
  hi = "full_lr=1e-3"
  parts = [] if ctx.smoke else [
      rv.Part("LoRA forgets less than full FT at the high lr", "general_ppl",
              ((hi, 1), ("lora", -1))),
      rv.Part("a lower lr forgets less than the high lr (full FT)", "general_ppl",
              ((hi, 1), ("full_lr=1e-4", -1))),
      rv.Part("at a task cost: LoRA's held-out task loss is above full FT's at the high lr",
              "task_loss", (("lora", 1), (hi, -1))),
      rv.Part("at a task cost: the lower lr's held-out task loss is above the high lr's",
              "task_loss", (("full_lr=1e-4", 1), (hi, -1))),
      rv.Part("replay of general text cuts forgetting (full FT, high lr)", "general_ppl",
              ((hi, 1), ("full_replay", -1)))]
  return {"root": root, "arms": arms_seen, "order": order, "parts": parts,
          "means": ["general_ppl", "general_ppl_rise", "task_loss", "task_score"],
          "extra": {"trainable params": _params},
          # The base (x = 0) is left out: its task figures would flatten the arms' scale.
          "plots": {"forgetting.png": lambda a, p: rv.errorbars(
              a, order[1:], "general_ppl_rise", ["task_score", "task_loss"], p,
              xlabel="forgetting: rise of held-out general-text perplexity over the base",
              title="Task vs forgetting per arm (mean and 95% t CI over seeds; the base, "
              f"before SFT: task score {a['base'][-1]['task_score']:.3f}, task loss "
              f"{a['base'][-1]['task_loss']:.3f})")}}


def qlora(ctx: Context) -> dict:
  root = os.path.join(ctx.workdir, "qlora")
  kinds = ("none", "nf4") if ctx.smoke else ("none", "nf4", "int4")
  arms = [("fp32" if k == "none" else k, sft_arg(ctx), {"quant.kind": k}) for k in kinds]
  arms_seen = _seeded(ctx, root, arms, fixed_overrides(ctx))
  order = ["base", *(a for a, _, _ in arms)]
  parts = [] if ctx.smoke else [
      rv.Part("NF4 (+double quant) LoRA matches fp32 LoRA within the margin (held-out loss)",
              "task_loss", (("nf4", 1), ("fp32", -1)), "equivalent", LOSS_MARGIN),
      rv.Part("NF4 matches fp32 within the margin (task score)", "task_score",
              (("nf4", 1), ("fp32", -1)), "equivalent", SCORE_MARGIN),
      rv.Part("NF4 is no worse than int4 by more than the margin (held-out loss)",
              "task_loss", (("int4", 1), ("nf4", -1)), "noninferior", LOSS_MARGIN)]
  return {"root": root, "arms": arms_seen, "order": order, "parts": parts,
          "means": ["task_loss", "task_score", "general_ppl"],
          "extra": {"trainable params": _params},
          "plots": {"qlora.png": lambda a, p: rv.errorbars(
              a, order[1:], None, ["task_loss", "task_score"], p,
              title="The same LoRA adapters on an fp32, NF4 and int4 base")}}


def dpo_beta(ctx: Context) -> dict:
  """Its own pipeline, seeds and README: ftjax/recipes/repro_rl.py (run() hands it over)."""
  return repro_rl.run("dpo_beta", ctx.workdir, None, None if ctx.tiny else ctx.base, ctx.steps,
                      ctx.smoke)


def grpo_steps(ctx: Context) -> dict:
  """Its own pipeline, seeds and README: ftjax/recipes/repro_rl.py (run() hands it over)."""
  return repro_rl.run("grpo_steps", ctx.workdir, None, None, ctx.steps, ctx.smoke)


STUDIES = {
    "lora_rank": Study(
        "LoRA rank ablation, and the other PEFT methods",
        "Hu et al. 2021 (LoRA), table 6: validation accuracy against the rank r",
        "SFT of the demo base on the support tickets: LoRA at ranks 1, 4, 8 and 64 (all linear "
        "layers, alpha = 2 rank, lr 6e-3), full fine-tuning (lr 1e-3), and as further rows "
        "(issue 21) prefix tuning (16 virtual tokens), prompt tuning (16 soft tokens, rows "
        "unpacked) and bottleneck adapters (Houlsby placement, reduction factor 16), all at "
        "the config's lr: trainable parameters against the task.",
        lora_rank, "--steps=300",
        claim=("A low LoRA rank (4 to 8) reaches the task score of rank 64 within noise, and "
               "raising the rank above 8 adds less than raising it to 8 did (Hu et al. 2021, "
               "table 6)."), tickets=120, seeds=3),
    "forgetting": Study(
        "Catastrophic forgetting and its mitigations",
        "Biderman et al. 2024 (\"LoRA Learns Less and Forgets Less\"), figures 1-3; Luo et "
        "al. 2023 (forgetting in continual instruction tuning)",
        "SFT of the demo base on the support tickets: full fine-tuning at a high lr (1e-3) and "
        "a lower one (1e-4), LoRA (rank 32, lr 6e-3: the demo's), and full fine-tuning at the "
        "high lr with general text replayed (the base's own pretraining documents, weight 1: "
        "half the mix); and, outside the claim, LoRA at a tenth of its lr (6e-4). Forgetting: "
        "the rise of the perplexity of held-out general text over the base's (`base`: before "
        "SFT).",
        forgetting, "--steps=300",
        claim=("LoRA and a lower learning rate forget less than full fine-tuning at a high "
               "learning rate (a smaller rise in held-out general-text perplexity), at a cost "
               "on the task; replaying general text cuts forgetting (Biderman et al. 2024; Luo "
               "et al. 2023)."), tickets=120, seeds=3),
    "qlora": Study(
        "QLoRA vs LoRA quality",
        "Dettmers et al. 2023 (QLoRA), tables 3-4: NF4 + double quantization matches 16-bit "
        "LoRA, and NF4 beats FP4/int4",
        "The same LoRA adapters (rank 32) trained on a float32 base, an NF4 base and an int4 "
        "base (block 64, double quantization): held-out loss and task score.",
        qlora, "--steps=300",
        claim=("LoRA on an NF4 (double-quantized) base matches LoRA on the full-precision "
               "base within noise, and NF4 is no worse than int4 (Dettmers et al. 2023, "
               "tables 3-4)."), tickets=120, seeds=3),
    "dpo_beta": Study(
        repro_rl.STUDIES["dpo_beta"]["title"], repro_rl.STUDIES["dpo_beta"]["mirrors"],
        repro_rl.STUDIES["dpo_beta"]["claim"], dpo_beta, repro_rl.STUDIES["dpo_beta"]["real"]),
    "grpo_steps": Study(
        repro_rl.STUDIES["grpo_steps"]["title"], repro_rl.STUDIES["grpo_steps"]["mirrors"],
        repro_rl.STUDIES["grpo_steps"]["claim"], grpo_steps,
        repro_rl.STUDIES["grpo_steps"]["real"]),
}


# ---------------------------------------------------------------- outputs

def run_seconds(root: str) -> float:
  """Seconds the runs under `root` took (sweep.py records them), whatever invocation ran them."""
  total = 0.0
  for d in sorted(os.listdir(root)):
    path = os.path.join(root, d, sweep.STATUS_FILE)
    if os.path.exists(path):
      with open(path) as f:
        total += float(json.load(f).get("seconds", 0.0))
  return total


def _base_line(ctx: Context) -> str:
  if not ctx.tiny:
    return f"the base {ctx.base}"
  sha = file_sha256(os.path.join(ctx.base, "model.safetensors"))
  return ("the session-7 demo base `ftjax/demo/base_v1` (the `demo` preset: a 0.5M-parameter "
          "llama, 2 layers, d_model 128, with its 1024-token BPE tokenizer; made by `python "
          "experiments/demo.py --pretrain` then: 3000 steps on support.make_base_corpus, see "
          "BUILD.md; "
          f"model.safetensors sha256 `{sha}`)")


def _rel(path: str) -> str:
  return os.path.relpath(path, recipes.REPO) if path.startswith(recipes.REPO) else path


def write_seeded_outputs(name: str, study: Study, result: dict, out: str, ctx: Context,
                         timing: dict) -> str:
  """README.md (claim, verdict, per-arm table with intervals, plots, command, wall time),
  report.csv / report.md / report_groups.csv / curves.png (report.py), the study's plot and
  verdict.json in `out`."""
  os.makedirs(out, exist_ok=True)
  rep = report.write_report(result["root"], out=out)
  if "metric" in rep:  # report.py's default plot against the first swept key: not the study's
    os.remove(rep["metric"])
  arms, order = result["arms"], result["order"]
  for fname, draw in result["plots"].items():
    draw(arms, os.path.join(out, fname))
  pngs = [f for f in (*result["plots"], "curves.png") if os.path.exists(os.path.join(out, f))]
  word, parts = rv.verdict(arms, result["parts"])
  if not parts:
    parts_note = ["(The smoke: too few arms and one seed; the parts are the full study's.)"]
  else:
    parts_note = []
  with open(os.path.join(out, "verdict.json"), "w") as f:
    json.dump({"claim": study.claim, "verdict": word, "parts": parts, "timing": timing,
               "seeds": ctx.seeds, "steps": ctx.steps, "tickets": ctx.tickets,
               "general": ctx.general}, f, indent=2)
  flags = " --smoke" if ctx.smoke else "".join(
      f" --{k}={v}" for k, v in (("seeds", ctx.seeds), ("tickets", ctx.tickets))
      if v != getattr(study, k))
  cmd = f"python experiments/repro.py --name={name}{flags}"
  cfg = recipes.get_config("repro", "stage=sft" + (",smoke" if ctx.smoke else ""))
  steps = ctx.steps or cfg.train.steps
  load = timing.get("load", {})
  load_text = (f"; machine load (1-min load average, sampled every 30 s) mean {load['mean']:.1f}, "
               f"max {load['max']:.1f} on {os.cpu_count()} CPUs" if load else "")
  text = [f"# {study.title}", "",
          f"Mirrors: {study.mirrors}.", "",
          f"**Claim.** {study.claim}", "",
          *rv.verdict_lines(word, parts), *parts_note, "",
          "The rules are code (ftjax/recipes/repro_verdict.py: `Part`, `decide`); the margins "
          f"are stated in ftjax/recipes/repro.py (task score {SCORE_MARGIN}: two points of the "
          f"mean of four rates; held-out loss {LOSS_MARGIN} nats, 5% of the SFT models' loss). "
          "The claim holds where every part holds, does not hold where any part does not.", "",
          "## Setup", "", study.what, "",
          f"Base: {_base_line(ctx)}. Every arm: {steps} SFT steps (configs/repro.py:stage=sft: "
          f"the demo's SFT config, batch {cfg.train.batch_size} x {cfg.train.seq_len} tokens, "
          f"warmup {cfg.optim.warmup_steps}), on "
          f"{ctx.seeds} seed(s) (train.seed = model.seed = data.seed = 0..{ctx.seeds - 1}). "
          f"Held-out: the first {ctx.tickets} support tickets of ftjax/demo/data/eval.jsonl "
          f"(greedy replies, 64 new tokens at most) and {ctx.general} documents of general "
          "text (WORKDIR/general_heldout.jsonl): shipping e-mails, order records with a note, "
          "ticket acknowledgements, product pages and FAQ lines "
          "from support.make_pretraining_text, the generator of the base's pretraining corpus, "
          f"at seed {GENERAL_SEED} (the base's corpus used seed 1000), without support threads "
          "(the task's own kind of text) and without any document that occurs verbatim in the "
          "base's 170,000: text of the kind the base learnt, which it never saw.", "",
          "## Command", "", f"    {cmd}", "",
          f"Wall time: {timing['wall_s'] / 60:.1f} min for the whole command (training "
          f"{timing['train_s'] / 60:.1f} min in {timing['runs']} runs, the rest measuring the "
          f"models), on the 2-core development VM{load_text}."
          + ("" if timing.get("complete", True) else " This invocation resumed the study: "
             "its wall time covers only the runs it trained and the measurements."), "",
          "## Results", "",
          "Per arm over its seeds: continuous measures as mean ± half-width of the 95% t "
          "interval; rates as counts pooled over seeds (rate, 95% Wilson interval). `details` "
          "counts the tickets with order details to quote; `task_score` is the mean of the four "
          "rates (details, 1 - invented, escalation_ok, voice) per model.", "",
          *rv.table(arms, order, result["means"], extra=result.get("extra")), "",
          *[f"![{f}]({f})" for f in pngs], "",
          "report.csv has every logged metric of every run (`final/`, `best/`, `measured/`), "
          "report_groups.csv / report.md the same grouped over seeds (ftjax/report.py); "
          "verdict.json the contrasts per seed; curves.png the training loss of each run.", "",
          "## On a real model", "",
          f"    python experiments/repro.py --name={name} --base=/path/to/hf_model "
          f"{study.real} --workdir=/big/disk/repro --out=/tmp/{name}", "",
          "The same arms, seeds and measurements; `--base` replaces the demo base (its own "
          "tokenizer is used) and `--steps` the CPU step count.", ""]
  path = os.path.join(out, "README.md")
  with open(path, "w") as f:
    f.write("\n".join(text))
  return path


class _LoadSampler:
  """The 1-minute load average every `every` seconds while a study runs (for its README)."""

  def __init__(self, every: float = 30.0):
    import threading
    self.samples = [os.getloadavg()[0]]
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, args=(every,), daemon=True)
    self._thread.start()

  def _loop(self, every):
    while not self._stop.wait(every):
      self.samples.append(os.getloadavg()[0])

  def stop(self) -> dict:
    self._stop.set()
    self.samples.append(os.getloadavg()[0])
    return {"mean": float(np.mean(self.samples)), "max": float(np.max(self.samples)),
            "n": len(self.samples)}


def _compile_cache(workdir: str):
  """A persistent compilation cache for the sweep's processes (the environment they inherit):
  the seeds of an arm run the same programs, so only the first compiles them."""
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(workdir, "jax_cache")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def _timing(result: dict, t0: float, load: dict) -> dict:
  """This invocation's wall time and load, kept in ROOT/timing.json when it trained a run; an
  invocation that only rewrote the outputs (every run done) reports the kept one."""
  root = result["root"]
  path = os.path.join(root, "timing.json")
  statuses = [os.path.join(root, d, sweep.STATUS_FILE) for d in sorted(os.listdir(root))]
  fresh = [os.path.getmtime(p) > t0 for p in statuses if os.path.exists(p)]
  if not any(fresh) and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  timing = {"wall_s": time.time() - t0, "train_s": run_seconds(root), "load": load,
            "runs": sum(len(v) for k, v in result["arms"].items() if k != "base"),
            "complete": all(fresh)}  # False: a resumed study, its wall time is partial
  with open(path, "w") as f:
    json.dump(timing, f, indent=2)
  return timing


def run(name: str, workdir: str, out: Optional[str] = None, base: Optional[str] = None,
        steps: int = 0, tickets: int = 0, general: int = 200, smoke: bool = False,
        seeds: int = 0) -> dict:
  """The study `name` in `workdir`. `base`: an HF directory (default: the shipped demo base);
  `tickets`, `seeds` 0: the study's defaults (Study.tickets, Study.seeds)."""
  if name not in STUDIES:
    raise UserError(f"--name={name!r}: expected one of {', '.join(sorted(STUDIES))}")
  if name in repro_rl.STUDIES:  # their own start models, seeds and README (no tiny base)
    return repro_rl.run(name, workdir, out, base, steps, smoke)
  if int(seeds) < 0 or int(tickets) < 0:
    raise UserError(f"--seeds={seeds}, --tickets={tickets}: expected integers >= 0")
  study = STUDIES[name]
  t0 = time.time()
  sampler = _LoadSampler()
  os.makedirs(workdir, exist_ok=True)
  _compile_cache(workdir)
  seeds = 1 if smoke else (seeds or study.seeds)
  tickets = 4 if smoke else (tickets or study.tickets)
  ctx = Context(workdir, base or demo.BASE_V1_DIR, general_eval_file(workdir, base is None),
                steps, tickets,
                16 if smoke else general, smoke, base is None, seeds,
                replay_file(workdir) if name == "forgetting" else "")
  result = study.run(ctx)
  out = out or os.path.join(recipes.REPO, "docs", "reproductions", name)
  readme = write_seeded_outputs(name, study, result, out, ctx, _timing(result, t0, sampler.stop()))
  return {**result, "readme": readme, "out": out}
