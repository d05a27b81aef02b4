"""KTO on unpaired (prompt, completion, label) rows, with a reference like DPO.

The loop is the DPO trainer's (`dpo.train_pairs`) with KTO batches (`ftjax.data.kto`); the loss is
`dpo.kto_loss_fn`. `run(config, workdir)` is what `experiments/kto.py` runs.
"""

from __future__ import annotations

from ftjax import workdir as wd
from ftjax.train import dpo


@wd.exclusive  # one run per workdir; a file or read-only disk is refused first
def run(config, workdir: str) -> dict:
  """Train; returns the last logged metrics (and eval metrics) as floats."""
  return dpo.train_pairs(config, workdir, "kto")
