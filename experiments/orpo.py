"""ORPO (odds-ratio preference optimisation) on preference pairs, reference-free.

  python experiments/orpo.py --config=configs/orpo.py --workdir=/tmp/orpo \
      --config.model.hf_path=/path/to/sft_hf --config.orpo.beta=0.1

The trainer is `ftjax.train.orpo` (its `run` holds the loop); rerunning resumes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.train.orpo import run  # noqa: E402

if __name__ == "__main__":
  cli.train_main(run, "configs/orpo.py:arg")
