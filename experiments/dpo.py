"""Direct preference optimisation (sigmoid, IPO, hinge, robust/cDPO) from an SFT model.

  python experiments/dpo.py --config=configs/dpo.py --workdir=/tmp/dpo \
      --config.model.hf_path=/path/to/sft_hf --config.dpo.beta=0.1

The trainer is `ftjax.train.dpo` (its `run` holds the loop); rerunning resumes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.train.dpo import run  # noqa: E402

if __name__ == "__main__":
  cli.train_main(run, "configs/dpo.py:arg")
