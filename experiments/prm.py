"""Process reward model: a step classifier (token-classification head) on TRL's PRM rows.

  python experiments/prm.py --config=configs/prm.py:task=arithmetic --workdir=/tmp/prm \
      --config.prm.error_fraction=0.5
  python experiments/export.py --workdir=/tmp/prm --out=/tmp/prm_hf   # *ForTokenClassification

The trainer is `ftjax.train.prm` (its `run` holds the loop); rerunning resumes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.train.prm import run  # noqa: E402

if __name__ == "__main__":
  cli.train_main(run, "configs/prm.py:arg")
