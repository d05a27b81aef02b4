"""Evaluate a workdir checkpoint or an HF model directory on held-out data.

  python experiments/eval.py --workdir=/tmp/sft --data=eval.jsonl --task=support
  python experiments/eval.py --model=/path/to/hf_dir --data=eval.jsonl
  python experiments/eval.py --model=/path/to/hf_dir --data=/tmp/safety/redteam.jsonl \
      --task=support_safety --seq_len=384 --max_new_tokens=80

Reports held-out loss and perplexity (completion / assistant tokens only) and, for chat data,
generation metrics of greedy replies: exact match, plus the task's own metrics
(`--task=support`: order details quoted, invented order numbers, escalations, brand voice;
`--task=support_safety`: the policy-keeping rate per policy and overall, on the red-team
tickets that `python -m ftjax.tasks.support_safety DIR` writes to DIR/redteam.jsonl).

The loss counts are reported too: `examples` (read), `loss_examples` (in the loss), `truncated`
(cut at --seq_len, still in the loss) and `dropped` (no completion token within --seq_len: left
out of the loss, with a warning). Rates come with their counts and a 95% Wilson interval:
`invented 1/120 (0.8%, 95% CI 0.1-4.6%)` on stdout, `invented_k`, `invented_n` and
`invented_ci95: [lo, hi]` in the JSON. The logic: ftjax/heldout.py.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

# This checkout's ftjax, whichever one pip installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli, heldout, stats  # noqa: E402


def define_flags():
  """Flags exist only when run as a script (cli.run), so that they never clash in a process
  that imports several of these scripts' packages."""
  flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint).")
  flags.DEFINE_string("model", None, "Or: an HF model directory.")
  flags.DEFINE_string("step", None, "Checkpoint step or 'best' (with --workdir).")
  flags.DEFINE_string("data", None, "Eval file (jsonl/json/parquet/csv).")
  flags.DEFINE_enum("format", "chat", ["chat", "alpaca", "prompt_completion", "text"],
                    "Data format.")
  flags.DEFINE_enum("task", "none", list(heldout.TASKS), "Task metrics for generations.")
  flags.DEFINE_integer("seq_len", 512, "Max tokens per example for the loss.")
  flags.DEFINE_integer("batch_size", 16, "Eval batch size.")
  flags.DEFINE_integer("max_examples", 0, "Evaluate the first N examples only (0: all).")
  flags.DEFINE_integer("max_new_tokens", 64, "Generation length.")
  flags.DEFINE_integer("show", 3, "Sample replies to print.")
  flags.DEFINE_string("out", None, "Write the metrics as JSON here.")


FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS.data:
    raise app.UsageError("--data is required")
  if FLAGS.out:
    heldout.check_out(FLAGS.out)
  m = heldout.evaluate(FLAGS.data, FLAGS.workdir, FLAGS.model, FLAGS.step, FLAGS.format,
                       FLAGS.task, FLAGS.seq_len, FLAGS.batch_size, FLAGS.max_examples,
                       FLAGS.max_new_tokens, FLAGS.show)
  for s in m.get("samples", []):
    print(f"> {s['prompt']}\n  reply: {s['reply']}\n  reference: {s['reference']}")
  print(f"loss over {m['loss_examples']} of {m['examples']} examples "
        f"({m['truncated']} truncated, {m['dropped']} dropped at --seq_len={FLAGS.seq_len})")
  for line in stats.proportion_lines(m):
    print(line)
  print(json.dumps({k: v for k, v in m.items() if k != "samples"}, indent=2))
  if FLAGS.out:
    heldout.write_json(FLAGS.out, m)
  logging.info("done")


if __name__ == "__main__":
  cli.run(main, define_flags)
