"""Runs a grid (or zip) of config overrides, one workdir per run; rerunning resumes the sweep.

  python experiments/sweep.py --config=configs/sft.py:adapter=lora --workdir=/tmp/sweep \
      --sweep=adapter.rank=1,2,4,8,16,64 --sweep=optim.lr=1e-4,3e-4 \
      --config.model.hf_path=/path/to/hf_dir --config.data.path=train.jsonl
  python experiments/report.py /tmp/sweep --x=adapter.rank --y=eval_loss

`--sweep=KEY=V1,V2,...` (repeatable; `;` separates values that hold commas) sweeps a config key;
`--mode=zip` pairs the i-th values of equal-length sweeps instead of taking every combination.
`--seeds=N` runs every setting with train.seed = 0..N-1 (as `--sweep=train.seed=0,...,N-1`,
crossed with the other sweeps in either mode); report.py then gives each group of seeds its
mean, std, n and a 95% interval.
`--config.KEY=VALUE` overrides go to every run. Each run is the experiment script (inferred
from the config, or `--script=dpo`) on `WORKDIR/<overrides>` (e.g. `adapter.rank=4,optim.lr=1e-4`),
in its own process, logging to `WORKDIR/<run>/log.txt`. Every run's overrides are checked
before any run starts. Rerunning the same command skips finished runs and resumes interrupted
ones; a failed run does not stop the others, and the sweep exits 1 naming the failed runs.
`--dry_run` prints one launch line per run to come (for a cluster's launcher) and writes nothing.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli, sweep  # noqa: E402
from ftjax import workdir as wd  # noqa: E402
from ftjax.errors import UserError  # noqa: E402


def define_flags():
  # Parsed here too, so a bad --config.* override is one line before anything runs.
  config_flags.DEFINE_config_file("config", None, "Config file (configs/sft.py:arg).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The sweep's root: one workdir per run under it.")
  flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,...: a config key and its values.")
  flags.DEFINE_integer("seeds", 0, "N: run every setting with train.seed = 0..N-1 (the same "
                       "as --sweep=train.seed=0,...,N-1, crossed with the other sweeps); "
                       "report.py gives each group of seeds a mean and a 95% interval.")
  flags.DEFINE_enum("mode", "grid", ["grid", "zip"], "grid: every combination; zip: the "
                    "i-th value of each sweep together (equal lengths).")
  flags.DEFINE_string("script", None, "Experiment script (sft, dpo, reward, grpo, ppo or a "
                      "path); default: inferred from the config.")
  flags.DEFINE_bool("dry_run", False, "Print one launch line per run to come; write nothing.")


FLAGS = flags.FLAGS


def fixed_overrides(argv: list[str]) -> list[str]:
  """The `--config.KEY=VALUE` arguments of the command line, passed on to every run."""
  out = []
  for a in argv[1:]:
    if a.startswith("--config."):
      if "=" not in a:
        raise UserError(f"{a}: write overrides as --config.KEY=VALUE for a sweep")
      out.append(a)
  return out


def main(argv):
  del argv
  if FLAGS.workdir is None or FLAGS.config is None or not (FLAGS.sweep or FLAGS.seeds):
    raise app.UsageError("--config, --workdir and at least one --sweep (or --seeds) are required")
  config_arg = FLAGS["config"].config_filename  # with its `:arg`
  sweeps = [sweep.parse_sweep(s) for s in FLAGS.sweep]
  fixed = fixed_overrides(sys.argv)
  runs = sweep.plan(config_arg, FLAGS.workdir, sweeps, fixed, FLAGS.mode, FLAGS.script,
                    seeds=FLAGS.seeds)
  if FLAGS.dry_run:
    for r in runs:
      if sweep.is_done(r):
        print(f"# done: {r.name}", file=sys.stderr)
      else:
        print(sweep.launch_line(r))
    return
  wd.check_writable(FLAGS.workdir)
  with wd.hold(FLAGS.workdir, multihost=False) as lock:  # a rerun of a running sweep is refused
    sweep.write_definition(FLAGS.workdir, config_arg, sweeps, fixed, FLAGS.mode, runs,
                           FLAGS.seeds)
    lock.started = True
    try:
      failed = sweep.run_all(runs)
    except KeyboardInterrupt as e:
      print(f"sweep stopped ({e}); rerun the same command to resume", file=sys.stderr)
      sys.exit(130)
  if failed:
    raise UserError(f"{len(failed)} of {len(runs)} runs failed: "
                    + "; ".join(f"{r.name} ({line})" for r, line in failed))
  print(f"{len(runs)} runs done in {FLAGS.workdir}; "
        f"report: python experiments/report.py {FLAGS.workdir}")


if __name__ == "__main__":
  cli.run(main, define_flags)
