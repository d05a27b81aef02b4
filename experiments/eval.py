"""Evaluate a workdir checkpoint or an HF model directory on held-out data.

  python experiments/eval.py --workdir=/tmp/sft --data=eval.jsonl --task=support
  python experiments/eval.py --model=/path/to/hf_dir --data=eval.jsonl

Reports held-out loss and perplexity (completion / assistant tokens only) and, for chat data,
generation metrics of greedy replies: exact match, plus the task's own metrics
(`--task=support`: order details quoted, invented order numbers, escalations, brand voice).

The loss counts are reported too: `examples` (read), `loss_examples` (in the loss), `truncated`
(cut at --seq_len, still in the loss) and `dropped` (no completion token within --seq_len: left
out of the loss, with a warning). Rates come with their counts and a 95% Wilson interval:
`invented 1/120 (0.8%, 95% CI 0.1-4.6%)` on stdout, `invented_k`, `invented_n` and
`invented_ci95: [lo, hi]` in the JSON.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ftjax import cli  # noqa: E402
import ftjax  # noqa: E402
from ftjax import data as data_lib, evaluation, stats, workdir as wd  # noqa: E402
from ftjax import tasks  # noqa: E402
from ftjax.errors import UserError  # noqa: E402
from ftjax.train import sft  # noqa: E402


TASKS = {"none": None, **tasks.reply_scorers()}


def define_flags():
  """Flags exist only when run as a script, so that tests and demo.py can import
  several experiment modules into one process without flag clashes."""
  flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint).")
  flags.DEFINE_string("model", None, "Or: an HF model directory.")
  flags.DEFINE_string("step", None, "Checkpoint step or 'best' (with --workdir).")
  flags.DEFINE_string("data", None, "Eval file (jsonl/json/parquet/csv).")
  flags.DEFINE_enum("format", "chat", ["chat", "alpaca", "prompt_completion", "text"],
                    "Data format.")
  flags.DEFINE_enum("task", "none", list(TASKS), "Task metrics for generations.")
  flags.DEFINE_integer("seq_len", 512, "Max tokens per example for the loss.")
  flags.DEFINE_integer("batch_size", 16, "Eval batch size.")
  flags.DEFINE_integer("max_examples", 0, "Evaluate the first N examples only (0: all).")
  flags.DEFINE_integer("max_new_tokens", 64, "Generation length.")
  flags.DEFINE_integer("show", 3, "Sample replies to print.")
  flags.DEFINE_string("out", None, "Write the metrics as JSON here.")


FLAGS = flags.FLAGS

def load(workdir=None, model_path=None, step=None):
  if workdir:
    model, params, tok, _ = wd.load_trained(workdir, step)
    return model, params, tok
  if not model_path:
    raise UserError("one of --workdir or --model is required")
  model, params = ftjax.load_pretrained(model_path)
  return model, params, ftjax.tokenizer.load_tokenizer(ftjax.hf.resolve(model_path))


def run(data_path, workdir=None, model_path=None, step=None, fmt="chat", task="none",
        seq_len=512, batch_size=16, max_examples=0, max_new_tokens=64, show=3,
        loaded=None) -> dict:
  """Metrics dict (and `samples`: a few prompt/reply/reference triples)."""
  model, params, tok = loaded or load(workdir, model_path, step)
  source = {"path": data_path, "format": fmt}
  if max_examples:
    source["limit"] = max_examples
  records = list(data_lib.load_records(source))
  data = data_lib.build_dataset({"sources": [source], "packing": False}, tok, seq_len,
                                batch_size)
  counts = {"examples": len(records), "loss_examples": data.stats.examples,
            "truncated": data.stats.truncated, "dropped": data.stats.dropped}
  if data.stats.dropped:
    logging.warning("--seq_len=%d: %d of %d examples of %s have no completion token within it "
                    "and are left out of eval_loss (%d evaluated, %d of them truncated)",
                    seq_len, data.stats.dropped, len(records), data_path,
                    data.stats.examples, data.stats.truncated)
  eval_fn = jax.jit(lambda p, b: sft.eval_step(p, b, model=model))
  loss_sum = n = 0.0
  for batch in data_lib.eval_batches(data.train.examples, batch_size, seq_len, pad_id=data.pad_id):
    out = jax.device_get(eval_fn(params, batch))
    loss_sum, n = loss_sum + float(out["loss_sum"]), n + float(out["target_tokens"])
  metrics = {"eval_loss": loss_sum / max(n, 1), "eval_ppl": float(np.exp(loss_sum / max(n, 1))),
             **counts}
  if fmt == "chat":
    prompts = [evaluation.split_chat(r)[0] for r in records]
    replies = evaluation.generate_replies(model, params, tok, prompts, max_new_tokens,
                                          batch_size)
    metrics.update(stats.add_wilson(evaluation.generation_metrics(replies, records,
                                                                  TASKS[task])))
    metrics["samples"] = [{"prompt": p[-1]["content"], "reply": r,
                           "reference": evaluation.split_chat(e)[1]}
                          for p, r, e in list(zip(prompts, replies, records))[:show]]
  return metrics


def check_out(out: str):
  """`--out` must be a file in a directory that exists and is writable: refused before the
  evaluation runs, not after it."""
  if os.path.isdir(out):
    raise UserError(f"--out={out}: is a directory; give a file, e.g. "
                    f"--out={os.path.join(out, 'eval.json')}")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise UserError(f"--out={out}: directory {parent} does not exist")
  if not os.access(parent, os.W_OK):
    raise UserError(f"--out={out}: directory {parent} is not writable")


def write_json(path: str, obj: dict):
  tmp = f"{path}.tmp{os.getpid()}"  # whole or not at all: an older eval.json is not cut short
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def main(argv):
  del argv
  if not FLAGS.data:
    raise app.UsageError("--data is required")
  if FLAGS.out:
    check_out(FLAGS.out)
  m = run(FLAGS.data, FLAGS.workdir, FLAGS.model, FLAGS.step, FLAGS.format, FLAGS.task,
          FLAGS.seq_len, FLAGS.batch_size, FLAGS.max_examples, FLAGS.max_new_tokens, FLAGS.show)
  for s in m.get("samples", []):
    print(f"> {s['prompt']}\n  reply: {s['reply']}\n  reference: {s['reference']}")
  print(f"loss over {m['loss_examples']} of {m['examples']} examples "
        f"({m['truncated']} truncated, {m['dropped']} dropped at --seq_len={FLAGS.seq_len})")
  for line in stats.proportion_lines(m):
    print(line)
  print(json.dumps({k: v for k, v in m.items() if k != "samples"}, indent=2))
  if FLAGS.out:
    write_json(FLAGS.out, m)
  logging.info("done")


if __name__ == "__main__":
  cli.run(main, define_flags)
