"""DPO (and IPO, hinge, robust/cDPO) from an SFT model, on preference pairs.

  python experiments/dpo.py --config=configs/dpo.py --workdir=/tmp/dpo \
      --config.model.hf_path=/path/to/sft_hf --config.data.path=prefs.jsonl --config.dpo.beta=0.1

`data.path` is required (a comma list of files; `data.eval_path` optional): rows in any of TRL's
preference layouts (`data.format=auto`, the default), or `format=pairs|chat` to insist on one.
`data=support` picks the support demo's pairs instead (the gold reply beats one that invents an
order number, drops the brand voice or escalates wrongly; chat form) and their eval split. The
arg takes the keys of configs/sft.py (model=, adapter=, quant=, format=, smoke) plus
`loss=sigmoid|ipo|hinge|robust` (or any TRL 1.16 DPO loss type: exo_pair, nca_pair,
bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm; several
joined by `+`, e.g. `loss=sigmoid+sft`, weighted by `--config.dpo.loss_weights=1.0,0.5`) and
`data=support`; print the resolved config with --print_config.
TRL's other DPOConfig keys: `dpo.ld_alpha` (LD-DPO; unset = none), `dpo.f_divergence_type`
(reverse_kl | forward_kl | js_divergence | alpha_divergence, with `dpo.f_alpha_divergence_coef`),
`dpo.discopop_tau`. On the command line a list is `--config.dpo.loss_type=sigmoid,sft`.
Pairs longer than train.seq_len cut the prompt from the left (it keeps its end) down to
`data.max_prompt_length` tokens (0, the default: half of seq_len) before the responses are cut;
pairs that truncation leaves with identical sides are counted in a warning, and data where all
of them are is refused (the same holds for configs/reward.py).
`dpo.reference`: auto (adapters off when training adapters, else a frozen copy of the initial
params) | precomputed (one pass over the data before training).
"""

from ml_collections import config_dict

from configs import common

ARG_KEYS = common.ARG_KEYS + ("data", "loss")


def get_config(arg=None):
  a = common.parse_arg(arg, ARG_KEYS, "configs/dpo.py")
  c = common.preference(a, "configs/dpo.py")
  c.dpo = dict(beta=0.1, loss_type=str(a.get("loss", "sigmoid")).replace("+", ","),
               label_smoothing=0.0, reference="auto", loss_weights="",
               ld_alpha=config_dict.placeholder(float), f_divergence_type="reverse_kl",
               f_alpha_divergence_coef=0.5, discopop_tau=0.05)
  return c
