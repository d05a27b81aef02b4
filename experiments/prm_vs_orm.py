"""PRM vs ORM vs majority vote for best-of-N (Lightman et al. 2023, figure 3) on column addition.

  python experiments/prm_vs_orm.py --workdir=/tmp/prm_vs_orm      # 3 seeds, N = 1..32
  python experiments/prm_vs_orm.py --workdir=/tmp/p --smoke --out=/tmp/p/out

The study, its settings and what it reports: ftjax/recipes/prm_vs_orm.py.
"""

from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.recipes import prm_vs_orm  # noqa: E402


def define_flags():
  flags.DEFINE_string("workdir", "/tmp/prm_vs_orm", "Reward-model runs (not committed).")
  flags.DEFINE_string("out", None, "README, results.json and curve.png "
                      "(default docs/reproductions/prm_vs_orm).")
  flags.DEFINE_integer("seeds", 3, "Seeds (each trains a PRM and an ORM).")
  flags.DEFINE_integer("steps", 0, "Training steps per reward model (0: the study's).")
  flags.DEFINE_bool("smoke", False, "A few steps, problems and samples: the pipeline only.")


FLAGS = flags.FLAGS


def main(argv):
  del argv
  r = prm_vs_orm.run(FLAGS.workdir, FLAGS.out, FLAGS.seeds, FLAGS.steps, FLAGS.smoke)
  with open(r["readme"]) as f:
    print(f.read())


if __name__ == "__main__":
  cli.run(main, define_flags)
