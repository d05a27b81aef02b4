"""KTO (Ethayarajh et al. 2024; TRL's KTOTrainer) on unpaired rows, from an SFT model.

  python experiments/kto.py --config=configs/kto.py --workdir=/tmp/kto \\
      --config.model.hf_path=/path/to/sft_hf --config.data.path=kto.jsonl

Rows in TRL's unpaired layout, (prompt, completion, label: true|false), strings or message lists;
paired rows (prompt, chosen, rejected) are unpaired as TRL's `unpair_preference_dataset` does,
so `data=support` (the demo's pairs) works too. The KL reference point comes from mismatched
(prompt, completion) rows, rotated within each batch's block of the data as TRL
(ftjax/data/kto.py). `kto.loss_type`: kto | apo_zero_unpaired; `kto.desirable_weight`,
`kto.undesirable_weight` weigh the two labels (TRL suggests keeping weight x count of the two
within 1:1 to 4:3). The reference is that of configs/dpo.py's `dpo.reference=auto`. Arg keys:
those of configs/dpo.py without loss=.
"""

from configs import common

ARG_KEYS = common.ARG_KEYS + ("data",)


def get_config(arg=None):
  a = common.parse_arg(arg, ARG_KEYS, "configs/kto.py")
  c = common.preference(a, "configs/kto.py")
  c.kto = dict(beta=0.1, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0)
  return c
