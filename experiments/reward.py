"""Bradley-Terry reward model: a scalar head on the decoder, trained on preference pairs.

  python experiments/reward.py --config=configs/reward.py --workdir=/tmp/rm \
      --config.model.hf_path=/path/to/hf_dir
  python experiments/export.py --workdir=/tmp/rm --out=/tmp/rm_hf   # *ForSequenceClassification

The trainer is `ftjax.train.reward` (its `run` holds the loop); rerunning resumes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.train.reward import run  # noqa: E402

if __name__ == "__main__":
  cli.train_main(run, "configs/reward.py:arg")
