"""CPO and SimPO on preference pairs, reference-free (configs/cpo.py:loss=simpo for SimPO).

  python experiments/cpo.py --config=configs/cpo.py --workdir=/tmp/cpo \
      --config.model.hf_path=/path/to/sft_hf --config.cpo.beta=0.1

The trainer is `ftjax.train.cpo` (its `run` holds the loop); rerunning resumes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.train.cpo import run  # noqa: E402

if __name__ == "__main__":
  cli.train_main(run, "configs/cpo.py:arg")
