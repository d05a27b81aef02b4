"""ORPO (Hong et al. 2024; TRL's experimental ORPOTrainer) on preference pairs, reference-free.

  python experiments/orpo.py --config=configs/orpo.py --workdir=/tmp/orpo \\
      --config.model.hf_path=/path/to/base_hf --config.data.path=prefs.jsonl --config.orpo.beta=0.1

The loss is the NLL of the chosen sequence (prompt and response tokens, as TRL) minus
`orpo.beta` (the paper's lambda) times the mean log-sigmoid of the log odds ratio of the mean
response logps. No reference model: no second forward and no copy of the params. Data, arg keys
(model=, adapter=, quant=, format=, data=support, smoke) and truncation are those of
configs/dpo.py. Logged: loss, nll_loss, log_odds_ratio, log_odds_chosen, rewards/* (beta times
the mean logps) and logps/*, under TRL's names.
"""

from configs import common

ARG_KEYS = common.ARG_KEYS + ("data",)


def get_config(arg=None):
  a = common.parse_arg(arg, ARG_KEYS, "configs/orpo.py")
  c = common.preference(a, "configs/orpo.py")
  c.orpo = dict(beta=0.1)
  return c
