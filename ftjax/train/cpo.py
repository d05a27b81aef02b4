"""CPO / SimPO, reference-free, on preference pairs.

The loop is the DPO trainer's (`dpo.train_pairs`) without a reference; the loss is
`dpo.cpo_loss_fn`. `run(config, workdir)` is what `experiments/cpo.py` runs.
"""

from __future__ import annotations

from ftjax import workdir as wd
from ftjax.train import dpo


@wd.exclusive  # one run per workdir; a file or read-only disk is refused first
def run(config, workdir: str) -> dict:
  """Train; returns the last logged metrics (and eval metrics) as floats."""
  return dpo.train_pairs(config, workdir, "cpo")
