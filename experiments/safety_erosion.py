"""Safety erosion by fine-tuning (Qi et al. 2023; Yang et al. 2023) in the support demo's world.

  python experiments/safety_erosion.py --workdir=/tmp/safety_erosion             # 3 seeds
  python experiments/safety_erosion.py --workdir=/tmp/s --base=/tmp/ftjax_demo   # a demo's base
  python experiments/safety_erosion.py --workdir=/tmp/s --smoke --out=/tmp/s/out

The study, its arms and what it reports: ftjax/recipes/safety_erosion.py.
"""

from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.recipes import safety_erosion  # noqa: E402


def define_flags():
  flags.DEFINE_string("workdir", "/tmp/safety_erosion", "Every run of the study (not committed).")
  flags.DEFINE_string("out", None, "README, results.json and kept.png "
                      "(default docs/reproductions/safety_erosion).")
  flags.DEFINE_string("base", None, "A demo workdir (its base_hf) or an HF model directory; "
                      "default: the session-7 demo base, ftjax/demo/base_v1.")
  flags.DEFINE_integer("seeds", 3, "Seeds (each: the safe SFT model and six arms).")
  flags.DEFINE_bool("smoke", False, "A few steps and tickets: the pipeline only.")


FLAGS = flags.FLAGS


def main(argv):
  del argv
  r = safety_erosion.run(FLAGS.workdir, FLAGS.out, FLAGS.seeds, FLAGS.smoke, FLAGS.base)
  with open(r["readme"]) as f:
    print(f.read())


if __name__ == "__main__":
  cli.run(main, define_flags)
