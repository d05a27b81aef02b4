"""KTO on unpaired (prompt, completion, label: bool) rows; paired rows are unpaired as TRL.

  python experiments/kto.py --config=configs/kto.py --workdir=/tmp/kto \
      --config.model.hf_path=/path/to/sft_hf --config.data.path=kto.jsonl

The trainer is `ftjax.train.kto` (its `run` holds the loop); rerunning resumes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.train.kto import run  # noqa: E402

if __name__ == "__main__":
  cli.train_main(run, "configs/kto.py:arg")
