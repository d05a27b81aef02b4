"""The DPO β study: true reward against KL to the reference, as in Rafailov et al. (2023), fig. 2.

  python experiments/beta_study.py --workdir=/tmp/beta_study

The study: ftjax/recipes/beta_study.py (also what --help prints).
"""

from __future__ import annotations

import os
import sys

from absl import flags

# This checkout's ftjax, whichever one pip installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli, report  # noqa: E402
from ftjax.recipes import beta_study  # noqa: E402

__doc__ = beta_study.__doc__  # absl's --help and usage errors print the main module's docstring


def define_flags():
  flags.DEFINE_string("workdir", "/tmp/ftjax_beta_study", "Where everything is written.")
  flags.DEFINE_string("sft", None, "SFT model (HF dir) to start from; default: run the demo.")
  flags.DEFINE_string("betas", "0.03,0.1,0.3,1.0", "Comma list of β.")
  flags.DEFINE_integer("steps", 60, "DPO steps per β.")
  flags.DEFINE_integer("prompts", 48, "Held-out tickets sampled per model.")
  flags.DEFINE_string("loss", "sigmoid", "DPO loss type.")
  flags.DEFINE_bool("smoke", False, "Tiny settings for CI.")


FLAGS = flags.FLAGS


def main(argv):
  del argv
  betas = [b for b in FLAGS.betas.split(",") if b]
  rows = beta_study.run(FLAGS.workdir, betas, FLAGS.sft, FLAGS.steps, FLAGS.prompts, FLAGS.loss,
                        FLAGS.smoke)
  out = rows[0]["report"]
  print(report.markdown(out["rows"], out["swept"]))
  for k in ("csv", "md", "frontier"):
    print(f"{k}: {out[k]}")


if __name__ == "__main__":
  cli.run(main, define_flags)
