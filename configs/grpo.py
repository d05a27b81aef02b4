"""GRPO (and GSPO, DAPO, Dr. GRPO) config: online RL with rewards on sampled completions.

  python experiments/grpo.py --config=configs/grpo.py:task=arithmetic --workdir=/tmp/grpo
  python experiments/grpo.py --config=configs/grpo.py --workdir=/tmp/grpo \
      --config.model.hf_path=/path/to/sft_hf --config.data.path=prompts.jsonl \
      "--config.grpo.rewards=('answer_match:answer',)"

  # GSM8K on a GPU (hub dataset openai/gsm8k, config main; `#### answer` reward; chat template):
  python experiments/grpo.py --config=configs/grpo.py:task=gsm8k --workdir=/tmp/gsm8k \
      --config.model.hf_path=Qwen/Qwen2.5-0.5B-Instruct

Data rows have a `prompt` column (string or chat messages; TRL's prompt-only layout); every
other column reaches the reward functions. `task=arithmetic` builds addition problems instead
(held-out operands in the eval split) and, without `model.hf_path`, a small tokenizer in the
workdir and a `model=` preset, warm-started by an SFT stage on solved train problems
(`grpo.warm_start_steps`, into WORKDIR/sft, exported to WORKDIR/sft_hf; 0: from scratch), of
which a fraction `grpo.warm_start_carry_drop` are a sloppy teacher's (every carry dropped).
Eval logs greedy pass_at_1 and pass_at_G (G samples) before training (`*_before`, step 0)
and at each eval; `task=support` (the demo's prompts and scorer) is what
`experiments/demo.py --rl=grpo` runs from the demo's SFT model.
`task=gsm8k` reads GSM8K's layout (`question`, `answer` with `#### 42`) from
`data.sources` / `data.eval_sources` (the hub's openai/gsm8k by default; local files in the
same layout work) and asks each question as a chat user turn. The arg takes the keys of
configs/sft.py plus `task=arithmetic|gsm8k|support` and `loss=grpo|bnpo|dr_grpo|dapo|rloo`.

`loss=rloo` is TRL's RLOOTrainer on the same rollout and step (Ahmadian et al. 2024):
leave-one-out advantages, `grpo.beta` as a reward penalty (summed old - ref logps), one
clipped ratio per sequence, and RLOOConfig's `grpo.normalize_advantages` (False) and
`grpo.reward_clip_range` (() or (min, max)); the clip is symmetric (`epsilon_high` 0, as
RLOOConfig's None). `beta` stays this config's (TRL's RLOOConfig default is 0.05).

  python experiments/grpo.py --config=configs/grpo.py:task=arithmetic,loss=rloo \
      --workdir=/tmp/rloo

`train.batch_size` counts completions per rollout (prompts * grpo.num_generations, as TRL's
batch sizes); `train.steps` counts rollouts, each followed by `grpo.num_iterations` updates on
its batch. `grpo.rewards` are built-ins `name[:arg]` of ftjax.rewards (`answer_match:answer`,
`format_match:REGEX`, `soft_overlong_punishment:MAX:CACHE`, `reward_model:PATH`,
`process_reward:PATH[:min|last]`, `support_scorer`), weighted by `grpo.reward_weights` (empty:
all 1). `process_reward` scores a completion's steps (lines) with a process reward model
(experiments/prm.py's workdir or export): the weakest step's P(good) with `min` (the default),
the last step's with `last`:

  python experiments/grpo.py --config=configs/grpo.py --workdir=/tmp/grpo_prm \
      --config.model.hf_path=/path/to/sft_hf --config.data.path=prompts.jsonl \
      "--config.grpo.rewards=('process_reward:/tmp/prm:min',)"
"""

import os

from configs import common, sft as sft_config
from ftjax.errors import UserError

ARG_KEYS = sft_config.ARG_KEYS + ("task", "loss")


def get_config(arg=None):
  a = sft_config.parse_arg(arg, ARG_KEYS, "configs/grpo.py")
  c = sft_config.get_config(",".join(p for p in (arg or "").split(",")
                                     if p.strip().partition("=")[0] in sft_config.ARG_KEYS))
  task = a.get("task", "")
  if task not in ("", "arithmetic", "gsm8k", "support"):
    raise UserError(f"configs/grpo.py: task={task!r}: expected arithmetic, gsm8k or support "
                    "(or no task= and --config.data.path=FILE)")
  c.task = task
  c.data.update(path="", eval_path="", format="prompt", eval_sources=[])
  c.data.eval_rows = 64  # eval prompts (greedy), when there is an eval split
  c.grpo = dict(
      num_generations=8, max_prompt_len=64, max_completion_length=32, temperature=1.0, top_k=0,
      top_p=1.0, loss_type=a.get("loss", "dapo"), beta=0.0, epsilon=0.2, epsilon_high=0.28,
      delta=0.0,  # 0: no upper bound on the unclipped ratio
      importance_sampling_level="token", scale_rewards="group", num_iterations=1,
      mask_truncated_completions=False, rewards=("answer_match:answer",), reward_weights=(),
      eval_max_new_tokens=0,  # 0: max_completion_length
      # task=arithmetic without model.hf_path: SFT steps first (0: GRPO from scratch).
      warm_start_steps=0, warm_start_rows=8000, warm_start_lr=3e-3, warm_start_carry_drop=0.0,
      eval_pass_at_g=task in ("arithmetic", "gsm8k"))  # also sample G per eval prompt
  if c.grpo.loss_type == "rloo":  # RLOOConfig's options (train/grpo.py reads their defaults
    # when absent, so a GRPO config stays as it was)
    c.grpo.update(normalize_advantages=False, reward_clip_range=(), epsilon_high=0.0)
  c.optim.update(lr=1e-5 if c.adapter.kind == "none" else 1e-4, warmup_steps=0,
                 schedule="constant", weight_decay=0.0)
  c.train.update(steps=100, batch_size=32, eval_every=20, save_every=20, log_every=1)
  if task == "arithmetic":
    c.grpo.update(max_prompt_len=16, max_completion_length=6,
                  rewards=("answer_match:answer", r"format_match:^\s*\d+"),
                  reward_weights=(1.0, 0.2))
    # Measured on CPU (BUILD.md). The warm start learns from a sloppy teacher: 75% of its
    # solved problems drop every carry (37+48=75), so the SFT model (the `demo` shape, 1500
    # steps) can add but answers most carry problems carry-less (greedy held-out pass@1 0.32,
    # pass@8 0.86); exact-match rewards then fix that. On clean solutions (carry_drop=0, 450
    # steps: pass@1 0.37) the same GRPO gained only 6.5 points in 200 steps. Full fine-tuning
    # under GRPO was noise driven at every lr tried; a LoRA of the SFT model at lr 1e-3 with
    # 64 prompts x 8 a step is what learns.
    if "model" not in a:
      c.model.preset = "demo"
    c.adapter.kind = c.adapter.kind if "adapter" in a else "lora"
    c.grpo.update(warm_start_steps=1500, warm_start_lr=1e-3, warm_start_carry_drop=0.75)
    c.optim.update(lr=3e-5 if c.adapter.kind == "none" else 1e-3, warmup_steps=10)
    c.train.update(steps=100, batch_size=512, eval_every=25, save_every=25)
    c.data.eval_rows = 200
    c.data.train_rows = 2000  # train problems GRPO samples from (held-out pairs never appear)
  if task == "support":  # the demo's prompts (their `meta` feeds the scorer), from its SFT model
    c.data.update(path=os.path.join(common.DEMO_DATA, "prefs_train.jsonl"),
                  eval_path=os.path.join(common.DEMO_DATA, "prefs_eval.jsonl"))
    c.grpo.update(max_prompt_len=160, max_completion_length=64, beta=0.04, temperature=0.7,
                  rewards=("support_scorer",), reward_weights=())
    c.optim.lr = 5e-4 if c.adapter.kind != "none" else 5e-6  # 2e-3 lowered the held-out score
    c.data.eval_rows = 48
    c.train.update(steps=40, batch_size=32, eval_every=20, save_every=20)
  if task == "gsm8k":
    hub = {"hub": "openai/gsm8k", "config": "main"}
    c.data.update(sources=[{**hub, "split": "train"}], eval_sources=[{**hub, "split": "test"}])
    c.data.eval_rows = 256
    c.model.update(dtype="bfloat16")
    c.grpo.update(max_prompt_len=256, max_completion_length=256, beta=0.0,
                  rewards=("answer_match:answer", r"format_match:####\s*-?[\d,\.]+"),
                  reward_weights=(1.0, 0.1))
    c.optim.lr = 1e-6 if c.adapter.kind == "none" else 1e-5
    c.train.update(steps=200, batch_size=64, eval_every=50, save_every=50)
  if a.get("smoke"):
    c.train.update(steps=4, batch_size=8, eval_every=2, save_every=2)
    c.grpo.update(num_generations=4, max_completion_length=6)
    c.data.eval_rows = 8
  return c
