"""The DPO β study: true reward against KL to the reference, as in Rafailov et al. (2023), fig. 2.

  python experiments/beta_study.py --workdir=/tmp/beta_study

On the support demo, whose reward is known (`support.true_reward`: order details quoted, no
invented order number, the right escalation, the brand voice), DPO runs from one SFT model for
each β; replies sampled (temperature 1) on held-out tickets are scored by the true reward, and
their KL to the SFT reference is estimated as the mean over samples of
sum_t [log π(y_t) - log π_ref(y_t)]. Writes beta_study.json, beta_study.md (a table) and
beta_study.png (the reward/KL frontier). Without --sft, the demo pipeline runs first and its
merged SFT export is the start and the reference.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from configs import dpo as dpo_config  # noqa: E402
from experiments import demo  # noqa: E402
from experiments import dpo as dpo_exp  # noqa: E402
from ftjax import cli, evaluation, load_pretrained, workdir as wd  # noqa: E402
from ftjax.data.sources import load_records  # noqa: E402
from ftjax.demo import support  # noqa: E402
from ftjax.tokenizer import load_tokenizer  # noqa: E402


def define_flags():
  flags.DEFINE_string("workdir", "/tmp/ftjax_beta_study", "Where everything is written.")
  flags.DEFINE_string("sft", None, "SFT model (HF dir) to start from; default: run the demo.")
  flags.DEFINE_string("betas", "0.03,0.1,0.3,1.0", "Comma list of β.")
  flags.DEFINE_integer("steps", 60, "DPO steps per β.")
  flags.DEFINE_integer("prompts", 48, "Held-out tickets sampled per model.")
  flags.DEFINE_string("loss", "sigmoid", "DPO loss type.")
  flags.DEFINE_bool("smoke", False, "Tiny settings for CI.")


FLAGS = flags.FLAGS


def measure(model, params, tok, ref, pairs, max_new_tokens, seed=0) -> dict:
  """Mean true reward of sampled replies and their KL to the reference model."""
  ref_model, ref_params = ref
  prompts = [p["prompt"] for p in pairs]
  samples = evaluation.sample_replies(model, params, tok, prompts, max_new_tokens, seed=seed)
  rewards, kls = [], []
  for s, pair in zip(samples, pairs):
    rewards.append(support.true_reward(s["text"], pair))
    ref_lp = evaluation.response_logprobs(ref_model, ref_params, s["prompt_tokens"][None],
                                          s["prompt_mask"][None], s["tokens"][None],
                                          s["mask"][None])[0]
    kls.append(float(((s["logprobs"] - ref_lp) * s["mask"]).sum()))
  return {"true_reward": float(np.mean(rewards)), "kl": float(np.mean(kls)),
          "kl_sem": float(np.std(kls) / np.sqrt(len(kls))),
          "reward_sem": float(np.std(rewards) / np.sqrt(len(rewards))),
          "example": samples[0]["text"]}


def run(workdir: str, betas, sft_dir=None, steps=60, n_prompts=48, loss="sigmoid",
        smoke=False) -> list[dict]:
  os.makedirs(workdir, exist_ok=True)
  if sft_dir is None:
    sft_dir = demo.run(os.path.join(workdir, "demo"), smoke=smoke,
                       eval_examples=8 if smoke else 48)["merged"]
  tok = load_tokenizer(sft_dir)
  ref = load_pretrained(sft_dir)
  pairs = list(load_records({"path": os.path.join(support.DATA_DIR, "prefs_eval.jsonl")}))
  pairs = pairs[:n_prompts]
  max_new = 16 if smoke else 64
  rows = [{"beta": None, "label": "SFT (reference)",
           **measure(ref[0], ref[1], tok, ref, pairs, max_new)}]
  for beta in betas:
    cfg = dpo_config.get_config("data=support,adapter=lora,loss=" + loss
                                + (",smoke" if smoke else ""))
    cfg.model.hf_path = sft_dir
    cfg.dpo.beta = float(beta)
    cfg.train.update(steps=steps, eval_every=steps, save_every=steps, seq_len=256,
                     eval_batches=2 if smoke else 0)  # smoke: not all 96 held-out pairs
    run_dir = os.path.join(workdir, f"dpo_beta{beta}")
    out = dpo_exp.run(cfg, run_dir)
    model, params, _, _ = wd.load_trained(run_dir)
    row = {"beta": float(beta), "label": f"DPO β={beta}",
           "pref_accuracy": out.get("eval_rewards/accuracies"),
           **measure(model, params, tok, ref, pairs, max_new)}
    rows.append(row)
    logging.info("β=%s: %s", beta, row)
  with open(os.path.join(workdir, "beta_study.json"), "w") as f:
    json.dump(rows, f, indent=2)
  with open(os.path.join(workdir, "beta_study.md"), "w") as f:
    f.write(format_table(rows) + "\n")
  plot(rows, os.path.join(workdir, "beta_study.png"))
  return rows


def format_table(rows) -> str:
  lines = ["| model | β | true reward | KL to SFT (nats) | held-out pref. accuracy |",
           "|---|---|---|---|---|"]
  for r in rows:
    acc = "" if r.get("pref_accuracy") is None else f"{100 * r['pref_accuracy']:.0f}%"
    beta = "" if r["beta"] is None else f"{r['beta']:g}"
    lines.append(f"| {r['label']} | {beta} | {r['true_reward']:.3f} ± {r['reward_sem']:.3f} | "
                 f"{r['kl']:.2f} ± {r['kl_sem']:.2f} | {acc} |")
  return "\n".join(lines)


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for r in rows:
    ax.errorbar(r["kl"], r["true_reward"], xerr=r["kl_sem"], yerr=r["reward_sem"], fmt="o",
                capsize=3, color="gray" if r["beta"] is None else "C0")
    ax.annotate(r["label"], (r["kl"], r["true_reward"]), textcoords="offset points",
                xytext=(5, 5), fontsize=8)
  ax.set_xlabel("KL(policy || SFT reference), nats per reply")
  ax.set_ylabel("true reward of sampled replies")
  ax.set_title("DPO reward/KL frontier (support demo)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  betas = [b for b in FLAGS.betas.split(",") if b]
  rows = run(FLAGS.workdir, betas, FLAGS.sft, FLAGS.steps, FLAGS.prompts, FLAGS.loss,
             FLAGS.smoke)
  print(format_table(rows))
  print(f"plot: {os.path.join(FLAGS.workdir, 'beta_study.png')}")


if __name__ == "__main__":
  cli.run(main, define_flags)
