"""GRPO (GSPO, DAPO, Dr. GRPO) from an SFT model, with rewards on sampled completions.

  python experiments/grpo.py --config=configs/grpo.py:task=arithmetic --workdir=/tmp/grpo
  python experiments/grpo.py --config=configs/grpo.py --workdir=/tmp/grpo \
      --config.model.hf_path=/path/to/sft_hf --config.data.path=prompts.jsonl

The trainer is `ftjax.train.grpo` (its `run` holds the loop); rerunning resumes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.train.grpo import run  # noqa: E402

if __name__ == "__main__":
  cli.train_main(run, "configs/grpo.py:arg")
