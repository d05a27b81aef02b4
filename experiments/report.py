"""Tables and plots over the runs under a directory (a sweep's root, or any workdirs).

  python experiments/report.py /tmp/sweep                       # report.csv, report.md, PNGs
  python experiments/report.py /tmp/sweep --x=adapter.rank --y=eval_loss --curve=loss

Writes into the root (or `--out`): report.csv (one row per run: the swept keys, the last step,
`final/<metric>` and `best/<metric>` of everything in its metrics.jsonl, `measured/<k>` from its
eval.json), report.md (the same, fewer columns: `--metrics` picks them), `<y>_vs_<x>.png` (a
metric's final value against a swept key, one line per setting of the other swept keys),
curves.png (`--curve` against the step, per run) and, for DPO runs, frontier.png (rewards against
a KL estimate, as in experiments/beta_study.py). Prints the markdown table. Runs that differ
only in their seeds (`sweep.py --seeds=N`) are grouped too: report_groups.csv and a second
table with each group's mean ± the half-width of its 95% interval and n, and error bars on the
metric plot.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli, report  # noqa: E402


def define_flags():
  flags.DEFINE_string("x", None, "Swept key on the x axis (default: the first swept key).")
  flags.DEFINE_string("y", None, "Metric on the y axis: a logged name (its final value), or a "
                      "column such as best/eval_loss (default: eval_loss, else loss).")
  flags.DEFINE_string("curve", "loss", "Metric drawn against the step in curves.png.")
  flags.DEFINE_list("metrics", None, "Columns of the markdown table (default: losses, DPO "
                    "rewards and KL, measurements).")
  flags.DEFINE_string("out", None, "Where to write (default: the root).")


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: report.py ROOT [--x=KEY --y=METRIC]")
  out = report.write_report(argv[1], FLAGS.x, FLAGS.y, FLAGS.curve, FLAGS.out, FLAGS.metrics)
  print(report.markdown(out["rows"], out["swept"], FLAGS.metrics))
  if out["groups"]:
    print(f"\n{report.GROUP_HEADING}\n")
    print(report.group_markdown(out["groups"], out["group_keys"], FLAGS.metrics))
  for k in ("csv", "md", "groups_csv", "metric", "curves", "frontier"):
    if k in out:
      print(f"{k}: {out[k]}")


if __name__ == "__main__":
  cli.run(main, define_flags)
