"""Reproductions of published fine-tuning results at CPU scale, one command each.

  python experiments/repro.py --name=qlora         # Dettmers et al. 2023: NF4 / int4 vs fp32

The studies and their measurements: ftjax/recipes/repro.py (also what --help prints).
"""

from __future__ import annotations

import os
import sys

from absl import flags

# This checkout's ftjax, whichever one pip installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.errors import UserError  # noqa: E402
from ftjax.recipes import repro  # noqa: E402

__doc__ = repro.__doc__  # absl's --help and usage errors print the main module's docstring


def define_flags():
  flags.DEFINE_enum("name", None, sorted(repro.STUDIES), "Which reproduction.")
  flags.DEFINE_string("workdir", "/tmp/ftjax_repro", "Runs and checkpoints (not committed).")
  flags.DEFINE_string("out", None, "Table, plots and README (default docs/reproductions/NAME).")
  flags.DEFINE_string("base", None, "An HF model directory as the base instead of the shipped "
                      "session-7 demo base ftjax/demo/base_v1 (a real model: give --steps too).")
  flags.DEFINE_integer("steps", 0, "Training steps per arm (0: the config's).")
  flags.DEFINE_integer("tickets", 0, "Held-out support tickets generated for per model (0: the "
                       "study's default: all 120 for the seeded studies, 24 for dpo_beta).")
  flags.DEFINE_integer("seeds", 0, "Seeds per arm of the seeded studies (0: the study's "
                       "default, 3).")
  flags.DEFINE_integer("general", 200, "Held-out general-text rows per model.")
  flags.DEFINE_bool("smoke", False, "A few steps and examples (CI): checks the pipeline only.")


FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.name is None:
    raise UserError("--name is required: one of " + ", ".join(sorted(repro.STUDIES)))
  r = repro.run(FLAGS.name, FLAGS.workdir, FLAGS.out, FLAGS.base, FLAGS.steps, FLAGS.tickets,
                FLAGS.general, FLAGS.smoke, FLAGS.seeds)
  with open(r["readme"]) as f:
    print(f.read())


if __name__ == "__main__":
  cli.run(main, define_flags)
