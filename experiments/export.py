"""Export a trained workdir as a merged HF model or a PEFT adapter.

  python experiments/export.py --workdir=/tmp/sft --out=/tmp/sft_hf --format=merged
  python experiments/export.py --workdir=/tmp/sft --out=/tmp/sft_lora --format=peft

The checkpoint is the latest one (`--step=best` for the best by eval loss, or a number).
The tokenizer is copied alongside. Files are written to a temporary directory and moved
into place only when complete.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli  # noqa: E402
import ftjax  # noqa: E402
from ftjax import hf, workdir as wd  # noqa: E402
from ftjax.errors import UserError  # noqa: E402


def define_flags():
  """Flags exist only when run as a script, so that tests and demo.py can import
  several experiment modules into one process without flag clashes."""
  flags.DEFINE_string("workdir", None, "Training workdir.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_enum("format", "merged", ["merged", "peft"], "Merged HF weights or a PEFT adapter.")
  flags.DEFINE_string("step", None, "Checkpoint step, or 'best' (default: latest).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "Dtype on disk for merged exports (default: the param dtype).")


FLAGS = flags.FLAGS

def run(workdir: str, out: str, format: str = "merged", step=None, dtype=None) -> str:
  import jax
  if jax.process_index() != 0:  # several hosts: one writer
    return out
  model, params, _, config = wd.load_trained(workdir, step)
  tok_dir = wd.tokenizer_path(config)
  if format == "merged":
    ftjax.save_pretrained(model, params, out, dtype=dtype, tokenizer_from=tok_dir)
  else:
    if model.spec.lora is None and model.spec.prefix is None:
      raise UserError(f"{workdir}: the run trained no adapter (adapter.kind=none); "
                       "use --format=merged")
    ftjax.save_adapter(model, params, out, base_model_name_or_path=config.model.hf_path or None)
    hf.copy_tokenizer(tok_dir, out)
  logging.info("exported %s (%s) to %s", workdir, format, out)
  return out


def main(argv):
  del argv
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError("--workdir and --out are required")
  run(FLAGS.workdir, FLAGS.out, FLAGS.format, FLAGS.step, FLAGS.dtype)


if __name__ == "__main__":
  cli.run(main, define_flags)
