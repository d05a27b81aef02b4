"""Supervised fine-tuning and continued pretraining.

  python experiments/sft.py --config=configs/sft.py:adapter=lora --workdir=/tmp/sft \
      --config.model.hf_path=/path/to/hf_dir --config.data.path=train.jsonl

The trainer is `ftjax.train.sft` (its `run` holds the loop); rerunning resumes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.train.sft import run  # noqa: E402

if __name__ == "__main__":
  cli.train_main(run, "configs/sft.py:arg")
