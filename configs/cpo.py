"""CPO and SimPO (TRL's experimental CPOTrainer) on preference pairs, reference-free.

  python experiments/cpo.py --config=configs/cpo.py --workdir=/tmp/cpo \\
      --config.model.hf_path=/path/to/sft_hf --config.data.path=prefs.jsonl
  python experiments/cpo.py --config=configs/cpo.py:loss=simpo --workdir=/tmp/simpo ...

loss = mean(pair loss) + cpo.cpo_alpha * NLL(chosen responses). `cpo.loss_type`: sigmoid (CPO),
hinge, ipo, simpo (length-normalised logps, margin cpo.simpo_gamma / beta). `loss=simpo` sets
loss_type=simpo and cpo_alpha=0: SimPO (Meng et al. 2024) as TRL runs it. `cpo.alpha` != 0 is
AlphaPO's reward shape. No reference model. Data, arg keys and truncation are those of
configs/dpo.py plus `loss=sigmoid|hinge|ipo|simpo`.
"""

from configs import common

ARG_KEYS = common.ARG_KEYS + ("data", "loss")


def get_config(arg=None):
  a = common.parse_arg(arg, ARG_KEYS, "configs/cpo.py")
  c = common.preference(a, "configs/cpo.py")
  loss = a.get("loss", "sigmoid")
  c.cpo = dict(beta=0.1, loss_type=loss, label_smoothing=0.0,
               cpo_alpha=0.0 if loss == "simpo" else 1.0, simpo_gamma=0.5, alpha=0.0)
  return c
