"""ORPO (odds-ratio preference optimisation) on preference pairs, reference-free.

  python experiments/orpo.py --config=configs/orpo.py --workdir=/tmp/orpo \
      --config.model.hf_path=/path/to/sft_hf --config.orpo.beta=0.1

The trainer is `ftjax.train.orpo` (its `run` holds the loop); rerunning resumes.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.train.orpo import run  # noqa: E402


def define_flags():
  """Flags exist only when run as a script, so that importing this module defines none."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/orpo.py:arg).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the config, metrics and checkpoints go.")


FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.workdir is None or FLAGS.config is None:
    raise app.UsageError("--config and --workdir are required")
  logging.info("done: %s", run(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
  cli.run(main, define_flags)
