"""The built-in demo: a customer-support assistant for Lumen Outfitters, end to end on a CPU.

  python experiments/demo.py --workdir=/tmp/ftjax_demo

Its stages: ftjax/recipes/demo.py (also what --help prints).
"""

from __future__ import annotations

import os
import sys

from absl import flags

# This checkout's ftjax, whichever one pip installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.errors import UserError  # noqa: E402
from ftjax.recipes import demo, second_adapter  # noqa: E402

__doc__ = demo.__doc__  # absl's --help and usage errors print the main module's docstring


def define_flags():
  flags.DEFINE_string("workdir", "/tmp/ftjax_demo", "Where every stage writes.")
  flags.DEFINE_string("base", None, "An HF model directory to fine-tune instead of the shipped "
                      "base (ftjax/demo/base).")
  flags.DEFINE_bool("pretrain", False, "Pretrain the base here first (the tokenizer, then 4000 "
                    "steps on retail text, support threads and copy drills: the recipe that "
                    "made ftjax/demo/base; ~15 minutes more on a CPU) instead of the shipped base.")
  flags.DEFINE_bool("smoke", False, "A few steps per stage (CI).")
  flags.DEFINE_integer("eval_examples", demo.EVAL_EXAMPLES,
                       "Held-out tickets to evaluate (0: all 120).")
  flags.DEFINE_integer("seed", 0, "The seed of every stage (train.seed, model.seed, data.seed).")
  flags.DEFINE_integer("seeds", 0, "Run seeds 0..N-1 (in WORKDIR/seed_K) and print the per-seed "
                       "table of the README's claims (BUILD.md); 0: one run of --seed.")
  flags.DEFINE_enum("rl", "none", list(demo.RL_KINDS), "After SFT: online RL (grpo: the task "
                    "scorer as reward; ppo: a reward model trained on the preference pairs) or "
                    "DPO (dpo: on the shipped pairs; aif: on pairs the SFT model labels itself "
                    "against ftjax/tasks/support_constitution.txt).")
  flags.DEFINE_bool("second_adapter", False, "After SFT: a second LoRA adapter in another "
                    "brand's voice on the same base, served beside the first in one batch "
                    "(ftjax/recipes/second_adapter.py; minutes more on a CPU).")


FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.seeds:
    if FLAGS.base or FLAGS.smoke or FLAGS.rl != "none" or FLAGS.second_adapter or FLAGS.pretrain:
      raise UserError("--seeds runs the default demo: drop --base, --pretrain, --smoke, --rl "
                      "and --second_adapter")
    print(demo.format_seed_table(demo.run_seeds(FLAGS.workdir, FLAGS.seeds,
                                                FLAGS.eval_examples)))
    return
  report = demo.run(FLAGS.workdir, FLAGS.base, FLAGS.smoke, FLAGS.eval_examples, FLAGS.rl,
                    FLAGS.seed, FLAGS.second_adapter, FLAGS.pretrain)
  print(demo.format_report(report))
  if "second_adapter" in report:
    print("\n".join(second_adapter.format_lines(report["second_adapter"])))


if __name__ == "__main__":
  cli.run(main, define_flags)
