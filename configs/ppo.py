"""PPO from an SFT model against a trained reward model (TRL's PPOTrainer, PPOConfig names).

  python experiments/ppo.py --config=configs/ppo.py --workdir=/tmp/ppo \
      --config.model.hf_path=/path/to/sft_hf --config.ppo.reward_model=/tmp/rm \
      --config.data.path=prompts.jsonl

`data.path` (a comma list of files, or `data.sources`; `data.eval_path` optional) holds
prompt-only rows: a `prompt` column, text or a conversation (TRL's layout); `data=support`
picks the prompts of the support demo's preference pairs (held-out ones for eval) and names
the task (`task`), whose checks of greedy replies the eval logs (eval_support/...).
`ppo.reward_model` is a workdir of experiments/reward.py or an HF
*ForSequenceClassification directory, with the policy's tokenizer.
`ppo.critic`: shared (a value head on the policy's trunk) | separate (a critic initialised
from the reward model, its score head as the value, trained whole).
`train.steps` counts PPO iterations (rollout batches of `train.batch_size` prompts), each
`ppo.num_ppo_epochs` x `ppo.num_mini_batches` optimizer steps. `ppo.missing_eos_penalty=0` and
`ppo.adap_kl_ctrl=False` switch those off (TRL's None / FixedKLController).
The arg takes model=, adapter=, quant=, smoke (as configs/sft.py) plus `data=support` and
`critic=shared|separate`. Print the resolved config with --print_config.
"""

import os

from configs import common
from ftjax.errors import UserError

ARG_KEYS = ("model", "adapter", "quant", "smoke", "data", "critic")


def get_config(arg=None):
  a = common.parse_arg(arg, ARG_KEYS, "configs/ppo.py")
  data = a.get("data", "")
  if data not in ("", "support"):
    raise UserError(f"configs/ppo.py: data={data!r}: expected support (or no data= and "
                    "--config.data.path=FILE)")
  critic = a.get("critic", "shared")
  if critic not in ("shared", "separate"):
    raise UserError(f"configs/ppo.py: critic={critic!r}: expected shared or separate")
  # Prompt-only rows; `eval_rows` caps the held-out prompts (0: all).
  prompts = dict(path="", sources=[], eval_path="", max_prompt_len=128, eval_rows=64)
  if data == "support":  # the prompts of the demo's preference pairs (their `meta` scores them)
    prompts.update(path=os.path.join(common.DEMO_DATA, "prefs_train.jsonl"),
                   eval_path=os.path.join(common.DEMO_DATA, "prefs_eval.jsonl"))
  c = common.base(a, prompts)
  c.task = data  # ftjax/tasks/: the support task's checks of held-out replies
  c.ppo = dict(reward_model="", critic=critic, num_ppo_epochs=4, num_mini_batches=1,
               response_length=53, temperature=0.7, kl_coef=0.05, kl_estimator="k1",
               cliprange=0.2, vf_coef=0.1, cliprange_value=0.2, gamma=1.0, lam=0.95,
               whiten_rewards=False, missing_eos_penalty=0.0,
               # Ziegler et al.'s adaptive KL controller (older TRL's adap_kl_ctrl, target,
               # horizon); it starts from kl_coef.
               adap_kl_ctrl=False, target=6.0, horizon=10000.0)
  c.optim.update(lr=1e-4 if c.adapter.kind != "none" else 3e-6, warmup_steps=0,
                 schedule="linear")  # TRL's PPO decays the lr linearly
  c.train.update(steps=100, batch_size=16, eval_every=25, save_every=25)
  if a.get("smoke"):
    c.ppo.update(response_length=16, num_ppo_epochs=2, num_mini_batches=2)
    c.data.update(max_prompt_len=96, eval_rows=4)
    c.train.update(steps=4, batch_size=4, eval_every=2, save_every=2)
  return c
