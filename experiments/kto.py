"""KTO on unpaired (prompt, completion, label: bool) rows; paired rows are unpaired as TRL.

  python experiments/kto.py --config=configs/kto.py --workdir=/tmp/kto \
      --config.model.hf_path=/path/to/sft_hf --config.data.path=kto.jsonl

The trainer is `ftjax.train.kto` (its `run` holds the loop); rerunning resumes.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.train.kto import run  # noqa: E402


def define_flags():
  """Flags exist only when run as a script, so that importing this module defines none."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/kto.py:arg).",
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
