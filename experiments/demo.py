"""The built-in demo: a customer-support assistant for Lumen Outfitters, end to end on a CPU.

  python experiments/demo.py --workdir=/tmp/ftjax_demo

1. a byte-level BPE tokenizer trained on the demo text (no download);
2. a small base model pretrained by ftjax itself (continued-pretraining mode, plain text),
   exported as an HF checkpoint -- or your own base with --base=HF_DIR;
3. LoRA SFT on support tickets (chat format, loss on the assistant turns only);
4. evaluation on held-out tickets before and after: order details quoted correctly, invented
   order numbers, correct escalations, brand voice, held-out loss; a few sample replies;
5. export: merged HF safetensors and a PEFT LoRA adapter.
Rerunning resumes each stage from its checkpoints.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import demo as demo_config  # noqa: E402
from experiments import eval as eval_exp  # noqa: E402
from experiments import export as export_exp  # noqa: E402
from experiments import sft as sft_exp  # noqa: E402
from ftjax import cli  # noqa: E402
from ftjax.demo import support  # noqa: E402
from ftjax.tokenizer import train_bpe_tokenizer  # noqa: E402


METRICS = [("details", "order details quoted correctly", True),
           ("invented", "replies with an invented order number", False),
           ("escalation_ok", "correct escalation decisions", True),
           ("voice", "brand voice (greeting + signature)", True),
           ("eval_loss", "held-out loss (assistant tokens)", False)]


def define_flags():
  """Flags exist only when run as a script, so that tests and demo.py can import
  several experiment modules into one process without flag clashes."""
  flags.DEFINE_string("workdir", "/tmp/ftjax_demo", "Where every stage writes.")
  flags.DEFINE_string("base", None, "An HF model directory to fine-tune instead of pretraining.")
  flags.DEFINE_bool("smoke", False, "A few steps per stage (CI).")
  flags.DEFINE_integer("eval_examples", 48, "Held-out tickets to evaluate (0: all).")


FLAGS = flags.FLAGS

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
  return eval_exp.run(os.path.join(support.DATA_DIR, "eval.jsonl"), fmt="chat", task="support",
                      seq_len=160, batch_size=16, max_examples=n, max_new_tokens=64, show=3,
                      loaded=loaded)


def run(workdir: str, base: str | None = None, smoke: bool = False, eval_examples: int = 48
        ) -> dict:
  t0 = time.time()
  if base is not None:  # a bad --base fails before the workdir is made
    from ftjax import hf
    hf.resolve(base)
  os.makedirs(workdir, exist_ok=True)
  times = {}
  if base is None:
    tok_dir = train_tokenizer(os.path.join(workdir, "tokenizer"))
    cfg = demo_config.get_config("stage=pretrain" + (",smoke" if smoke else ""))
    cfg.model.tokenizer = tok_dir
    pre_dir = os.path.join(workdir, "pretrain")
    logging.info("[1/4] pretraining the %s base on retail text", cfg.model.preset)
    sft_exp.run(cfg, pre_dir)
    base = export_exp.run(pre_dir, os.path.join(workdir, "base_hf"), "merged")
    times["pretrain_s"] = time.time() - t0
  from ftjax import load_pretrained
  from ftjax.tokenizer import load_tokenizer
  model, params = load_pretrained(base)
  logging.info("[2/4] evaluating the base on held-out tickets")
  before = evaluate((model, params, load_tokenizer(base)), eval_examples)

  t1 = time.time()
  cfg = demo_config.get_config("stage=sft" + (",smoke" if smoke else ""))
  cfg.model.hf_path = base
  sft_dir = os.path.join(workdir, "sft")
  logging.info("[3/4] LoRA SFT on support tickets")
  sft_exp.run(cfg, sft_dir)
  times["sft_s"] = time.time() - t1
  from ftjax import workdir as wd
  after = evaluate(wd.load_trained(sft_dir)[:3], eval_examples)

  logging.info("[4/4] exporting")
  merged = export_exp.run(sft_dir, os.path.join(workdir, "export_merged"), "merged")
  adapter = export_exp.run(sft_dir, os.path.join(workdir, "export_lora"), "peft")
  times["total_s"] = time.time() - t0
  report = {"before": {k: before[k] for k, _, _ in METRICS},
            "after": {k: after[k] for k, _, _ in METRICS},
            "samples": after["samples"], "merged": merged, "adapter": adapter, **times}
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def format_report(r: dict) -> str:
  lines = ["", "Lumen Outfitters support assistant: held-out tickets, before and after LoRA SFT",
           f"{'metric':<44}{'base':>10}{'after SFT':>12}"]
  for k, label, _ in METRICS:
    fmt = (lambda v: f"{v:.3f}") if k == "eval_loss" else (lambda v: f"{100 * v:.0f}%")
    lines.append(f"{label:<44}{fmt(r['before'][k]):>10}{fmt(r['after'][k]):>12}")
  lines.append("")
  for s in r["samples"]:
    lines += [f"customer: {s['prompt']}", f"  assistant: {s['reply']}"]
  lines += ["", f"merged HF model: {r['merged']}", f"PEFT adapter:    {r['adapter']}",
            f"time: {r['total_s']:.0f}s"]
  return "\n".join(lines)


def main(argv):
  del argv
  report = run(FLAGS.workdir, FLAGS.base, FLAGS.smoke, FLAGS.eval_examples)
  print(format_report(report))


if __name__ == "__main__":
  cli.run(main, define_flags)
