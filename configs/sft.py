"""Supervised fine-tuning (and continued pretraining) config.

  python experiments/sft.py --config=configs/sft.py:adapter=lora --workdir=/tmp/sft \
      --config.model.hf_path=/path/to/hf_dir --config.data.path=train.jsonl

The arg is a comma list of `key=value` or flags:
  model=PRESET      a preset from ftjax.config.PRESETS (used when model.hf_path is empty)
  adapter=KIND      none | lora | dora | prefix | prompt | bottleneck
  quant=KIND        none | nf4 | int4 (frozen base in 4 bits; needs an adapter)
  format=FMT        chat | alpaca | prompt_completion | text
  smoke             shrink everything so the config runs in CI in seconds
Print the resolved config (arg and --config.* overrides applied) with --print_config.
"""

from configs import common
from configs.common import parse_arg  # noqa: F401  (configs and tests import it from here)

ARG_KEYS = common.ARG_KEYS


def get_config(arg=None):
  return common.base(parse_arg(arg, ARG_KEYS, "configs/sft.py"))
