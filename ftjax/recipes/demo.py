"""The built-in demo: a customer-support assistant for Lumen Outfitters, end to end on a CPU.

  python experiments/demo.py --workdir=/tmp/ftjax_demo

1-2. the base: by default the shipped one (ftjax/demo/base: a 0.56M-parameter llama with its
   byte-level BPE tokenizer, pretrained by ftjax itself); with --pretrain, the recipe that made
   it, run here: the tokenizer trained on the demo text (no download), then 4000 steps on
   generated retail text, plain-text support threads and copy drills (~15 minutes on a CPU),
   exported as an HF checkpoint; or your own base with --base=HF_DIR;
3. LoRA SFT on support tickets (chat format, loss on the assistant turns only);
4. evaluation on held-out tickets before and after: order details quoted correctly, invented
   order numbers, correct escalations, brand voice, held-out loss; a few sample replies;
5. export: merged HF safetensors and a PEFT LoRA adapter;
6. with --rl=grpo|ppo|dpo|aif (opt-in: minutes more on a CPU), RL or preference tuning from the
   merged SFT model with a fresh LoRA adapter: GRPO with the demo's task scorer as the reward
   (configs/grpo.py:task=support), or PPO against a Bradley-Terry reward model that
   experiments/reward.py first trains on the shipped preference pairs (configs/ppo.py:
   data=support), or DPO on those human-style pairs (configs/dpo.py:data=support), or AI
   feedback: the SFT model samples k replies to training tickets, judges them itself against
   the rubric ftjax/tasks/support_constitution.txt (ftjax/labeling.py), and DPO trains on its
   best-versus-worst pairs (same DPO config). Then the held-out metrics again, and the KL to the
   SFT model (the reference: the adapter off).
Rerunning resumes each stage from its checkpoints.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging

from ftjax import export, heldout, hf, labeling, load_pretrained, recipes, stats, workdir as wd
from ftjax.recipes import second_adapter as second
from ftjax.errors import UserError
from ftjax.tasks import support
from ftjax.tokenizer import load_tokenizer, train_bpe_tokenizer
from ftjax.train import dpo, grpo, ppo, reward, sft


METRICS = [("details", "order details quoted correctly", True),
           ("invented", "replies with an invented order number", False),
           ("escalation_ok", "correct escalation decisions", True),
           ("voice", "brand voice (greeting + signature)", True),
           ("eval_loss", "held-out loss (assistant tokens)", False)]


RL_KINDS = ("none", "grpo", "ppo", "dpo", "aif")

# The aif stage's judge: the SFT model itself, reading its verdict after this rubric.
CONSTITUTION = os.path.join(os.path.dirname(os.path.abspath(support.__file__)),
                            "support_constitution.txt")
# Its labelling: the first `prompts` training tickets, k replies each at T=1 (label.py's
# defaults), best vs worst by the judge. The 1..10 verdict, not yes/no: the demo model, which
# never saw a judging prompt, puts ~1e-3 of its next-token mass on "1".."10" (digits fill its
# tickets) but ~1e-10 on "yes"/"no", so P(yes) would be a ratio of two vanishing numbers; and
# with "10" = "1" "0" in its tokenizer all ten verdicts come from one forward. Neither form
# reaches label.py's default min_score_mass (0.5) on this model, so the stage takes the
# normalised verdict distribution whatever its mass (min_score_mass=0) and reports how often
# the task's rule scorer agrees with the judge's pairs instead. Sizes, for at most about 3
# minutes on the 2-core CPU: labelling 256 tickets x 4 replies took 47 s there (loaded by
# other jobs), and DPO_STEPS of DPO ~0.75 s each.
AIF = dict(prompts=256, k=4, max_new_tokens=64, judge_scale="10")
AIF_SMOKE = dict(prompts=4, k=2, max_new_tokens=8, judge_scale="10")
# --rl=dpo and --rl=aif run configs/dpo.py:data=support with these steps, so the two differ
# only in their pairs: 100 x 8 pairs is one pass over the 800 shipped ones (the config's 200
# would double the stage's time).
DPO_STEPS = 100

# All 120 shipped held-out tickets: at 48, one ticket moved a rate by 2 points.
EVAL_EXAMPLES = 0
EVAL_TICKETS = support.SPLITS["eval"][0]


def seeded(cfg, seed: int):
  """`cfg` with `seed` in train.seed, model.seed and data.seed (PPO's prompt data has no order
  seed): the init, the data order and the sampling keys of a stage all follow --seed.
  configs/common.py fixes data.seed=0, so it is set here too, not left to train.seed."""
  cfg.train.seed = cfg.model.seed = int(seed)
  if "seed" in cfg.data:
    cfg.data.seed = int(seed)
  return cfg


def stage_config(name: str, arg: str, smoke: bool, seed: int):
  """A stage's config (configs/<name>.py:<arg>[,smoke]) with the demo's seed in it."""
  return seeded(recipes.get_config(name, arg + (",smoke" if smoke else "")), seed)


def train_tokenizer(out_dir: str, vocab_size: int = 1024):
  if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
    return out_dir
  texts = []
  for name in ("pretrain", "train"):
    with open(os.path.join(support.DATA_DIR, f"{name}.jsonl")) as f:
      for line in f:
        row = json.loads(line)
        texts.append(row["text"] if "text" in row else
                     " ".join(m["content"] for m in row["messages"]))
  train_bpe_tokenizer(texts, vocab_size, out_dir)
  return out_dir


def evaluate(loaded, n: int) -> dict:
  # One batch of all the tickets: greedy decoding of a model this small costs per step, not
  # per row, so 120 rows at once take what 16 did.
  batch = min(n, EVAL_TICKETS) if n else EVAL_TICKETS
  return heldout.evaluate(os.path.join(support.DATA_DIR, "eval.jsonl"), fmt="chat",
                          task="support", seq_len=160, batch_size=batch, max_examples=n,
                          max_new_tokens=64, show=3, loaded=loaded)


def run_rl(kind: str, workdir: str, merged: str, smoke: bool, eval_examples: int,
           seed: int = 0) -> dict:
  """Stage 6: GRPO, PPO, DPO or AI feedback + DPO from the merged SFT model; (held-out
  metrics, KL to SFT, seconds, and a preference stage's held-out pair accuracy)."""
  t0 = time.time()
  rl_dir = os.path.join(workdir, kind)
  extra = {}
  if kind == "grpo":
    cfg = stage_config("grpo", "task=support", smoke, seed)
    cfg.model.hf_path = merged
    logging.info("[6/6] GRPO with the task scorer as reward")
    out = grpo.run(cfg, rl_dir)
    kl, kl_unit = out.get("kl"), "k3, per token"  # TRL's GRPO `kl`: mean over tokens
  elif kind == "ppo":
    rcfg = stage_config("reward", "data=support", smoke, seed)
    rcfg.model.hf_path = merged
    rm_dir = os.path.join(workdir, "reward_model")
    logging.info("[6/6] a reward model on the preference pairs, then PPO against it")
    reward.run(rcfg, rm_dir)
    cfg = stage_config("ppo", "data=support", smoke, seed)
    cfg.model.hf_path = merged
    cfg.ppo.reward_model = rm_dir
    out = ppo.run(cfg, rl_dir)
    # TRL's PPO `objective/kl`: summed over each completion's tokens, then averaged.
    kl, kl_unit = out.get("objective/kl"), f"{cfg.ppo.kl_estimator}, per reply"
  elif kind in ("dpo", "aif"):
    cfg = stage_config("dpo", "data=support", smoke, seed)
    cfg.model.hf_path = merged
    if smoke:  # one eval, on 16 of the 96 held-out pairs: the smoke's seconds are in its evals
      cfg.train.update(eval_every=cfg.train.steps, eval_batches=4)
    else:
      cfg.train.steps = DPO_STEPS
    if kind == "aif":
      logging.info("[6/6] AI feedback: the SFT model labels its own replies, then DPO")
      extra["labels"] = label_own_replies(workdir, merged, smoke, seed)
      cfg.data.path = extra["labels"]["path"]
    else:
      logging.info("[6/6] DPO on the shipped preference pairs")
    out = dpo.run(cfg, rl_dir)
    # DPO's `kl/chosen`: k1 (log pi - log ref) on the last logged batch's chosen replies, mean
    # per token (the reference: the adapter off, the SFT model).
    kl, kl_unit = out.get("kl/chosen"), "k1, per token"
    # The held-out human-style pairs (prefs_eval) both variants are scored on.
    acc = "eval_rewards/accuracies"
    if f"{acc}_n" in out:
      extra["pair_accuracy"] = {"k": out[f"{acc}_k"], "n": out[f"{acc}_n"]}
  else:
    raise ValueError(f"unknown RL stage {kind!r}: expected one of {RL_KINDS[1:]}")
  after = evaluate(wd.load_trained(rl_dir)[:3], eval_examples)
  return {"metrics": _metrics(after), "kl_to_sft": kl, "kl_unit": kl_unit,
          "samples": after["samples"], "seconds": time.time() - t0, **extra}


def label_own_replies(workdir: str, merged: str, smoke: bool, seed: int) -> dict:
  """The aif stage's pairs: `merged` samples k replies to the first training tickets and judges
  them itself against CONSTITUTION (labeling.label). Written once to workdir/aif_labels/
  pairs.jsonl with its provenance (a rerun with the same settings reuses them). Returns the
  provenance with `path`, and how often the task's rule scorer agrees with the judge: of the
  pairs whose chosen and rejected reply it scores differently, those it ranks the judge's way."""
  sizes = AIF_SMOKE if smoke else AIF
  out_dir = os.path.join(workdir, "aif_labels")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "pairs.jsonl")
  data = os.path.join(support.DATA_DIR, "train.jsonl")
  want = dict(seed=seed, k=sizes["k"], prompts=sizes["prompts"],
              max_new_tokens=sizes["max_new_tokens"], judge_scale=sizes["judge_scale"],
              policy=os.path.abspath(merged))
  prov = None
  if os.path.exists(path + ".provenance.json"):
    with open(path + ".provenance.json") as f:
      prov = json.load(f)
    if any(prov.get(k) != v for k, v in want.items()):
      prov = None
  if prov is None:
    prov = labeling.label(merged, data, path, f"llm:{merged}", k=sizes["k"],
                          rubric=CONSTITUTION, judge_scale=sizes["judge_scale"],
                          min_score_mass=0.0, max_new_tokens=sizes["max_new_tokens"],
                          seed=seed, max_prompts=sizes["prompts"])
  meta = {json.dumps(r["prompt"]): r["meta"]
          for r in labeling.load_prompt_rows(data)[:sizes["prompts"]]}
  agree = decided = 0
  with open(path) as f:
    for line in f:
      p = json.loads(line)
      example = {"prompt": p["prompt"], "meta": meta[json.dumps(p["prompt"])]}
      c, r = (support.true_reward(p[side][-1]["content"], example)
              for side in ("chosen", "rejected"))
      if c != r:
        decided += 1
        agree += c > r
  return {**prov, "path": path, "rule_agree_k": agree, "rule_agree_n": decided}


def _metrics(ev: dict) -> dict:
  """The report's metrics of one evaluation, each rate with its counts (`<m>_k` of `<m>_n`)."""
  return {k: ev[k] for k, _, _ in METRICS} | {
      f"{k}_{c}": ev[f"{k}_{c}"] for k, _, _ in METRICS for c in "kn" if f"{k}_{c}" in ev}


# The shipped base (a merged HF export with its tokenizer): `pretrain_base` with seed 0, i.e.
# `python experiments/demo.py --pretrain --workdir=W` wrote it to W/base_hf (BUILD.md, "The
# demo": the command, commit, time and checks). Pretraining a base that copies order details
# takes ~4000 steps, about 15 minutes on a 2-core CPU: more than the demo's time, so the demo
# starts from this one by default, like any fine-tuning from a downloaded checkpoint.
BASE_DIR = os.path.join(os.path.dirname(support.DATA_DIR), "base")
# The session-7 base (the `demo` preset, 3000 steps on support.make_base_corpus; it copies no
# tracking code): the base of the published reproductions and the safety-erosion study, kept so
# that their commands still give their tables (docs/reproductions).
BASE_V1_DIR = os.path.join(os.path.dirname(support.DATA_DIR), "base_v1")
# `--pretrain --smoke`: a corpus just big enough for the smoke's steps.
SMOKE_CORPUS = 2000


def pretrain_base(workdir: str, smoke: bool = False, seed: int = 0) -> str:
  """Stages 1-2 of `--pretrain`: the tokenizer, then the `demo-mha` model pretrained from scratch
  on `support.make_copy_corpus` (written to workdir/base_corpus.jsonl) and exported to
  workdir/base_hf (merged, with its tokenizer). Returns that directory."""
  tok_dir = train_tokenizer(os.path.join(workdir, "tokenizer"))
  cfg = stage_config("demo", "stage=pretrain", smoke, seed)
  cfg.model.tokenizer = tok_dir
  corpus = os.path.join(workdir, "base_corpus.jsonl")
  if not os.path.exists(corpus):
    n = SMOKE_CORPUS if smoke else support.COPY_CORPUS["n"]
    support.write_jsonl(corpus + ".tmp", support.make_copy_corpus(n, seed))
    os.replace(corpus + ".tmp", corpus)
  cfg.data.path = corpus
  pre_dir = os.path.join(workdir, "pretrain")
  logging.info("[1/4] pretraining the %s base on retail text and support threads",
               cfg.model.preset)
  sft.run(cfg, pre_dir)
  return export.export(pre_dir, os.path.join(workdir, "base_hf"), "merged")


def run(workdir: str, base: str | None = None, smoke: bool = False,
        eval_examples: int = EVAL_EXAMPLES, rl: str = "none", seed: int = 0,
        second_adapter: bool = False, pretrain: bool = False) -> dict:
  """The demo in `workdir`: LoRA SFT of `base` (default: the shipped base, BASE_DIR), or with
  `pretrain` of a base pretrained here first (the recipe that made BASE_DIR)."""
  t0 = time.time()
  if base is not None and pretrain:
    raise UserError("--base and --pretrain: give one (--pretrain builds the base itself)")
  if base is not None:  # a bad --base fails before the workdir is made
    hf.resolve(base)
  os.makedirs(workdir, exist_ok=True)
  times = {}
  if pretrain:
    base = pretrain_base(workdir, smoke, seed)
    times["pretrain_s"] = time.time() - t0
  elif base is None:
    base = BASE_DIR
  model, params = load_pretrained(base)
  logging.info("[2/4] evaluating the base on held-out tickets")
  t1 = time.time()
  before = evaluate((model, params, load_tokenizer(base)), eval_examples)
  times["eval_base_s"] = time.time() - t1

  t1 = time.time()
  cfg = stage_config("demo", "stage=sft", smoke, seed)
  cfg.model.hf_path = base
  sft_dir = os.path.join(workdir, "sft")
  logging.info("[3/4] LoRA SFT on support tickets")
  sft.run(cfg, sft_dir)
  times["sft_s"] = time.time() - t1
  t1 = time.time()
  after = evaluate(wd.load_trained(sft_dir)[:3], eval_examples)
  times["eval_sft_s"] = time.time() - t1

  logging.info("[4/4] exporting")
  merged = export.export(sft_dir, os.path.join(workdir, "export_merged"), "merged")
  adapter = export.export(sft_dir, os.path.join(workdir, "export_lora"), "peft")
  report = {"seed": seed, "before": _metrics(before), "after": _metrics(after),
            "samples": after["samples"], "merged": merged, "adapter": adapter}
  if second_adapter:  # another brand's LoRA on the same base, both served in one batch
    report["second_adapter"] = second.run(cfg, workdir, sft_dir, eval_examples)
  if rl != "none":
    r = run_rl(rl, workdir, merged, smoke, eval_examples, seed)
    report.update(rl=rl, after_rl=r["metrics"], kl_to_sft=r["kl_to_sft"], kl_unit=r["kl_unit"],
                  samples=r["samples"])
    report.update({k: r[k] for k in ("labels", "pair_accuracy") if k in r})
    times["rl_s"] = r["seconds"]
  times["total_s"] = time.time() - t0
  report.update(times)
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def _fmt_kl(kl) -> str:
  return "-" if kl is None else f"{kl:.4f}"


def format_report(r: dict) -> str:
  rl = r.get("rl")
  lines = ["", "Lumen Outfitters support assistant: held-out tickets, before and after LoRA SFT"
           + (f" and {rl.upper()}" if rl else ""),
           f"{'metric':<44}{'base':>10}{'after SFT':>12}"
           + (f"{'after ' + rl.upper():>12}" if rl else "")]
  for k, label, _ in METRICS:
    fmt = (lambda v: f"{v:.3f}") if k == "eval_loss" else (lambda v: f"{100 * v:.0f}%")
    lines.append(f"{label:<44}{fmt(r['before'][k]):>10}{fmt(r['after'][k]):>12}"
                 + (f"{fmt(r['after_rl'][k]):>12}" if rl else ""))
  if rl:
    kl_label = f"KL to the SFT model ({r.get('kl_unit', 'per token')}, last step)"
    lines.append(f"{kl_label:<44}{'':>10}{'':>12}"
                 f"{_fmt_kl(r['kl_to_sft']):>12}")
  for stage, title in (("before", "base"), ("after", "after SFT"), ("after_rl", f"after {rl}")):
    if stage in r:
      lines += ["", f"{title} (seed {r.get('seed', 0)}): counts and 95% Wilson intervals"]
      lines += [f"  {line}" for line in proportion_lines(r[stage])]
  if "pair_accuracy" in r:
    a = r["pair_accuracy"]
    lines.append("  " + stats.format_proportion("held-out preference pairs ranked right",
                                                a["k"], a["n"]))
  if "labels" in r:
    lb = r["labels"]
    lines += ["", f"AI labels ({lb['judge_name']}, rubric {os.path.basename(lb['rubric'])}, "
              f"verdicts {lb['judge_scale']}): {lb['pairs']} pairs from {lb['prompts']} "
              f"training tickets x {lb['k']} replies ({lb['ties']} ties), {lb['path']}"]
    if lb["rule_agree_n"]:
      lines.append("  " + stats.format_proportion(
          "pairs the task scorer ranks as the judge", lb["rule_agree_k"], lb["rule_agree_n"]))
  lines.append("")
  for s in r["samples"]:
    lines += [f"customer: {s['prompt']}", f"  assistant: {s['reply']}"]
  stage_times = ", ".join(f"{k.removesuffix('_s')} {r[k]:.0f}s" for k in TIMES if k in r)
  lines += ["", f"merged HF model: {r['merged']}", f"PEFT adapter:    {r['adapter']}",
            f"time: {r['total_s']:.0f}s ({stage_times})"]
  return "\n".join(lines)


TIMES = ("pretrain_s", "eval_base_s", "sft_s", "eval_sft_s", "rl_s")


def proportion_lines(metrics: dict) -> list[str]:
  """`invented 1/120 (0.8%, 95% CI 0.1-4.6%)` for each rate of METRICS that has its counts."""
  return [stats.format_proportion(k, metrics[f"{k}_k"], metrics[f"{k}_n"])
          for k, _, _ in METRICS if metrics.get(f"{k}_n")]


# The README's headline claims, checked on every seed of `--seeds` (issue 19): (metric, bound,
# True when the rate must be at least the bound).
CLAIMS = (("details", 0.80, True), ("invented", 0.02, False), ("escalation_ok", 0.95, True),
          ("voice", 0.95, True))


def run_seeds(workdir: str, n_seeds: int, eval_examples: int = EVAL_EXAMPLES) -> list[dict]:
  """The demo on seeds 0..n_seeds-1, each in workdir/seed_K (finished stages resume)."""
  return [run(os.path.join(workdir, f"seed_{k}"), eval_examples=eval_examples, seed=k)
          for k in range(n_seeds)]


def meets_claims(after: dict) -> bool:
  return all(after[k] >= b if at_least else after[k] <= b for k, b, at_least in CLAIMS)


def format_seed_table(reports: list[dict]) -> str:
  """A markdown table of the SFT model's held-out figures per seed (counts and Wilson 95%
  intervals), whether each seed meets CLAIMS, and the worst seed's figure of each metric."""
  def cell(a, k):
    p, lo, hi = stats.wilson(a[f"{k}_k"], a[f"{k}_n"])
    return f"{a[f'{k}_k']}/{a[f'{k}_n']} ({100 * p:.1f}%, {100 * lo:.1f}-{100 * hi:.1f}%)"

  rates = [k for k, _, _ in CLAIMS]
  lines = ["| seed | " + " | ".join(rates) + " | held-out loss | meets claims | time |",
           "|---|" + "---|" * (len(rates) + 3)]
  for r in reports:
    a = r["after"]
    lines.append(f"| {r['seed']} | " + " | ".join(cell(a, k) for k in rates)
                 + f" | {a['eval_loss']:.3f} | {'yes' if meets_claims(a) else 'NO'} | "
                 f"{r['total_s']:.0f} s |")
  worst = []
  for k, _, at_least in CLAIMS:
    r = (min if at_least else max)(reports, key=lambda r: r["after"][k])
    lo, hi = (min(x["after"][k] for x in reports), max(x["after"][k] for x in reports))
    a = r["after"]
    worst.append(f"- {stats.format_proportion(k, a[k + '_k'], a[k + '_n'])} (worst seed, "
                 f"{r['seed']}); over seeds {100 * lo:.1f}-{100 * hi:.1f}%")
  claims = ", ".join(f"{k} {'>=' if ge else '<='} {100 * b:g}%" for k, b, ge in CLAIMS)
  held = sum(meets_claims(r["after"]) for r in reports)
  return "\n".join(lines + ["", f"{held}/{len(reports)} seeds meet the claims ({claims})."]
                   + worst)
