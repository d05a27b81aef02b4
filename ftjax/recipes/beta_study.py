"""The DPO β study: true reward against KL to the reference, as in Rafailov et al. (2023), fig. 2.

  python experiments/beta_study.py --workdir=/tmp/beta_study

On the support demo, whose reward is known (`support.true_reward`: order details quoted, no
invented order number, the right escalation, the brand voice), DPO runs from one SFT model for
each β; replies sampled (temperature 1) on held-out tickets are scored by the true reward, and
their KL to the SFT reference is estimated as the mean over samples of
sum_t [log π(y_t) - log π_ref(y_t)]. Without --sft, the demo pipeline runs first (WORKDIR/demo)
and its merged SFT export is the start and the reference.

It is a sweep and a report: the DPO runs are `experiments/sweep.py --sweep=dpo.beta=...` runs
(one process each, WORKDIR/dpo/dpo.beta=<β>; rerunning skips the finished ones), each model's
measurements go to WORKDIR/dpo/<run>/eval.json (the reference's to WORKDIR/dpo/reference), and
`experiments/report.py WORKDIR/dpo --x=dpo.beta --y=true_reward` writes report.csv, report.md
and frontier.png (true reward, and TRL's rewards/chosen and rewards/margins, against the KL).
"""

from __future__ import annotations

import json
import os

from absl import logging
import numpy as np

from ftjax import evaluation, load_pretrained, recipes, report, rollout, sweep, workdir as wd
from ftjax.data.sources import load_records
from ftjax.tasks import support
from ftjax.errors import UserError
from ftjax.recipes import demo
from ftjax.tokenizer import load_tokenizer


def measure(model, params, tok, ref, pairs, max_new_tokens, seed=0) -> dict:
  """Mean true reward of sampled replies and their KL to the reference model."""
  ref_model, ref_params = ref
  prompts = [p["prompt"] for p in pairs]
  samples = evaluation.sample_replies(model, params, tok, prompts, max_new_tokens, seed=seed)
  rewards, kls = [], []
  for s, pair in zip(samples, pairs):
    rewards.append(support.true_reward(s["text"], pair))
    ref_lp = np.asarray(rollout.completion_logprobs(ref_model, ref_params, {
        "prompt_tokens": s["prompt_tokens"][None], "prompt_mask": s["prompt_mask"][None],
        "completion_tokens": s["tokens"][None], "completion_mask": s["mask"][None]}))[0]
    kls.append(float(((s["logprobs"] - ref_lp) * s["mask"]).sum()))
  # `x_sem` beside `x`: report.py draws and prints it as x's error bar.
  return {"true_reward": float(np.mean(rewards)), "kl": float(np.mean(kls)),
          "kl_sem": float(np.std(kls) / np.sqrt(len(kls))),
          "true_reward_sem": float(np.std(rewards) / np.sqrt(len(rewards))),
          "example": samples[0]["text"]}


def run(workdir: str, betas, sft_dir=None, steps=60, n_prompts=48, loss="sigmoid",
        smoke=False) -> list[dict]:
  """The demo (unless `sft_dir`), a sweep over dpo.beta, measurements, a report; returns one
  row per model (the SFT reference first)."""
  os.makedirs(workdir, exist_ok=True)
  if sft_dir is None:
    sft_dir = demo.run(os.path.join(workdir, "demo"), smoke=smoke,
                       eval_examples=8 if smoke else 48)["merged"]
  root = os.path.join(workdir, "dpo")
  config_arg = recipes.config_file("dpo") + ":data=support,adapter=lora,loss=" + \
      loss + (",smoke" if smoke else "")
  fixed = [f"--config.model.hf_path={sft_dir}", f"--config.train.steps={steps}",
           f"--config.train.eval_every={steps}", f"--config.train.save_every={steps}",
           "--config.train.seq_len=256",
           f"--config.train.eval_batches={2 if smoke else 0}"]  # smoke: not all 96 held-out pairs
  sweeps = [("dpo.beta", [str(b) for b in betas])]
  runs = sweep.plan(config_arg, root, sweeps, fixed)
  sweep.write_definition(root, config_arg, sweeps, fixed, "grid", runs)
  failed = sweep.run_all(runs, logging.info)
  if failed:
    raise UserError("; ".join(f"{r.workdir}: {line}" for r, line in failed))

  tok = load_tokenizer(sft_dir)
  ref = load_pretrained(sft_dir)
  pairs = list(load_records({"path": os.path.join(support.DATA_DIR, "prefs_eval.jsonl")}))
  pairs = pairs[:n_prompts]
  max_new = 16 if smoke else 64
  models = [("reference", lambda: ref)]
  models += [(r.name, lambda r=r: wd.load_trained(r.workdir)[:2]) for r in runs]
  for name, load in models:
    model, params = load()
    measured = measure(model, params, tok, ref, pairs, max_new)
    os.makedirs(os.path.join(root, name), exist_ok=True)
    with open(os.path.join(root, name, "eval.json"), "w") as f:
      json.dump(measured, f, indent=2)
    logging.info("%s: %s", name, measured)
  out = report.write_report(root, x="dpo.beta", y="measured/true_reward")
  rows = {r["run"]: r for r in out["rows"]}
  return [{"beta": None if name == "reference" else float(name.partition("=")[2]),
           "label": "SFT (reference)" if name == "reference" else f"DPO β={name.partition('=')[2]}",
           "true_reward": rows[name]["measured/true_reward"], "kl": rows[name]["measured/kl"],
           "reward_sem": rows[name]["measured/true_reward_sem"],
           "kl_sem": rows[name]["measured/kl_sem"],
           "pref_accuracy": rows[name].get("final/eval_rewards/accuracies"),
           "report": out}
          for name, _ in models]

