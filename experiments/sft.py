"""Supervised fine-tuning and continued pretraining.

  python experiments/sft.py --config=configs/sft.py:adapter=lora --workdir=/tmp/sft \
      --config.model.hf_path=/path/to/hf_dir --config.data.path=train.jsonl

The trainer is `ftjax.train.sft` (its `run` holds the loop); rerunning resumes.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.train.sft import run  # noqa: E402


def define_flags():
  """Flags exist only when run as a script, so that importing this module defines none."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/sft.py:arg).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the config, metrics and checkpoints go.")


FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.workdir is None or FLAGS.config is None:
    raise app.UsageError("--config and --workdir are required")
  t0 = time.time()
  out = run(FLAGS.config, FLAGS.workdir)
  logging.info("done in %.1fs: %s", time.time() - t0, out)


if __name__ == "__main__":
  cli.run(main, define_flags)
