"""Export a trained workdir as a merged HF model, a PEFT adapter, or bottleneck adapters in the
`adapters` library's layout (AdapterHub: `model.load_adapter(out)`; ftjax/adapterhub.py).

  python experiments/export.py --workdir=/tmp/sft --out=/tmp/sft_hf --format=merged
  python experiments/export.py --workdir=/tmp/sft --out=/tmp/sft_lora --format=peft
  python experiments/export.py --workdir=/tmp/bn --out=/tmp/bn_ahub --format=adapterhub

The checkpoint is the latest one (`--step=best` for the best by eval loss, or a number).
The tokenizer is copied alongside. Files are written to a temporary directory and moved
into place only when complete; the directory gets an `ftjax_export.json` (workdir, step,
format) that marks it as an ftjax export.

`--out` is checked before the model is loaded. Refused: the run's base model or tokenizer
directory, an ftjax workdir (this one or another), a checkpoint folder, any directory that
holds or lies inside one of these (a subfolder of a workdir outside its checkpoints/ is fine),
a path whose parent cannot be written, and a non-empty directory that is not an earlier ftjax
export unless `--overwrite` (an earlier export is replaced). The logic: ftjax/export.py.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

# This checkout's ftjax, whichever one pip installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli, export  # noqa: E402


def define_flags():
  """Flags exist only when run as a script (cli.run), so that they never clash in a process
  that imports several of these scripts' packages."""
  flags.DEFINE_string("workdir", None, "Training workdir.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_enum("format", "merged", ["merged", "peft", "adapterhub"],
                    "Merged HF weights, a PEFT adapter, or bottleneck adapters in the adapters "
                    "library's layout (AdapterHub).")
  flags.DEFINE_string("step", None, "Checkpoint step, or 'best': the lowest eval loss; refused "
                      "for a run that saved no eval loss (default: latest).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "Dtype on disk for merged exports (default: the param dtype).")
  flags.DEFINE_bool("overwrite", False, "Replace the model files of a non-empty --out that is "
                    "not an earlier ftjax export (an earlier export is always replaced).")


FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError("--workdir and --out are required")
  export.export(FLAGS.workdir, FLAGS.out, FLAGS.format, FLAGS.step, FLAGS.dtype, FLAGS.overwrite)


if __name__ == "__main__":
  cli.run(main, define_flags)
