"""PPO (RLHF) from an SFT model against a trained reward model, TRL's PPOTrainer in a loop.

  python experiments/ppo.py --config=configs/ppo.py:data=support --workdir=/tmp/ppo \
      --config.model.hf_path=/path/to/sft_hf --config.ppo.reward_model=/tmp/rm

The trainer is `ftjax.train.ppo` (its `run` holds the loop); rerunning resumes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
from ftjax.train.ppo import run  # noqa: E402

if __name__ == "__main__":
  cli.train_main(run, "configs/ppo.py:arg")
