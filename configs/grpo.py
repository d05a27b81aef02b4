"""GRPO (and GSPO, DAPO, Dr. GRPO) config: online RL with rewards on sampled completions.

  python experiments/grpo.py --config=configs/grpo.py:task=arithmetic --workdir=/tmp/grpo
  python experiments/grpo.py --config=configs/grpo.py --workdir=/tmp/grpo \
      --config.model.hf_path=/path/to/sft_hf --config.data.path=prompts.jsonl \
      --config.grpo.rewards=answer_match:answer

Data rows have a `prompt` column (string or chat messages; TRL's prompt-only layout); every
other column reaches the reward functions. `task=arithmetic` builds addition problems instead
(held-out operands in the eval split) and, without `model.hf_path`, a small tokenizer in the
workdir and a `model=` preset from scratch. The arg takes the keys of configs/sft.py plus
`task=arithmetic` and `loss=grpo|bnpo|dr_grpo|dapo`.

`train.batch_size` counts completions per rollout (prompts * grpo.num_generations, as TRL's
batch sizes); `train.steps` counts rollouts, each followed by `grpo.num_iterations` updates on
its batch. `grpo.rewards` are built-ins `name[:arg]` of ftjax.rewards (`answer_match:answer`,
`format_match:REGEX`, `soft_overlong_punishment:MAX:CACHE`, `reward_model:PATH`,
`support_scorer`), weighted by `grpo.reward_weights` (empty: all 1).
"""

from configs import sft as sft_config
from ftjax.errors import UserError

ARG_KEYS = sft_config.ARG_KEYS + ("task", "loss")


def get_config(arg=None):
  a = sft_config.parse_arg(arg, ARG_KEYS, "configs/grpo.py")
  c = sft_config.get_config(",".join(p for p in (arg or "").split(",")
                                     if p.strip().partition("=")[0] in sft_config.ARG_KEYS))
  task = a.get("task", "")
  if task not in ("", "arithmetic"):
    raise UserError(f"configs/grpo.py: task={task!r}: expected arithmetic (or no task= and "
                    "--config.data.path=FILE)")
  c.task = task
  c.data.update(path="", eval_path="", format="prompt")
  c.data.eval_rows = 64  # eval prompts (greedy), when there is an eval split
  c.grpo = dict(
      num_generations=8, max_prompt_len=64, max_completion_length=32, temperature=1.0, top_k=0,
      top_p=1.0, loss_type=a.get("loss", "dapo"), beta=0.0, epsilon=0.2, epsilon_high=0.28,
      delta=0.0,  # 0: no upper bound on the unclipped ratio
      importance_sampling_level="token", scale_rewards="group", num_iterations=1,
      mask_truncated_completions=False, rewards=("answer_match:answer",), reward_weights=(),
      eval_max_new_tokens=0)  # 0: max_completion_length
  c.optim.update(lr=1e-5 if c.adapter.kind == "none" else 1e-4, warmup_steps=0,
                 schedule="constant", weight_decay=0.0)
  c.train.update(steps=100, batch_size=32, eval_every=20, save_every=20, log_every=1)
  if task == "arithmetic":
    c.grpo.update(max_prompt_len=16, max_completion_length=6,
                  rewards=("answer_match:answer", r"format_match:^\s*\d+"),
                  reward_weights=(1.0, 0.2))
    c.adapter.kind = c.adapter.kind if "adapter" in a else "none"
    c.optim.lr = 3e-4 if c.adapter.kind == "none" else 3e-3
  if a.get("smoke"):
    c.train.update(steps=4, batch_size=8, eval_every=2, save_every=2)
    c.grpo.update(num_generations=4, max_completion_length=6)
    c.data.eval_rows = 8
  return c
