"""Reports over runs: final and best metrics of every workdir under a root, as CSV, markdown
and matplotlib plots (a metric against a swept key, loss curves, the DPO reward/KL frontier).

A run is a directory holding `config.json`, `metrics.jsonl` or `eval.json`; its row has the
swept keys (those of the root's `sweep.json`, and any other config key whose value differs
between runs), its status (from sweep.py), the last logged step, and for each logged metric `m`
`final/m` (its last logged value) and, where the name says which way is better (a loss, an
accuracy, a reward, ...), `best/m` (the best logged value). `eval.json` holds measurements of
the finished run (what `experiments/eval.py --out=WORKDIR/eval.json` writes, or the β study's
sampled reward and KL): they become `measured/k`.

Runs that differ only in their seeds (`train.seed`, `model.seed`, `data.seed`: what
`sweep.py --seeds=N` makes) are also grouped: each group gets the mean, std (ddof=1), n and a 95%
interval of every metric (a Student t interval; the Wilson interval of the pooled counts for a
measured proportion), in report_groups.csv and a second table of report.md (`mean ± half-width`),
and the metric plot draws the group means with error bars. Without such groups the report is one
row per run, as before. metrics.jsonl is read by `ftjax.metrics.read_metrics`, as training reads
it: a torn last line (a killed run) is skipped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from typing import Optional

from ftjax import stats, tasks
from ftjax.errors import UserError
from ftjax.metrics import read_metrics
from ftjax.provenance import flatten

RUN_FILES = ("config.json", "metrics.jsonl", "eval.json")
SWEEP_FILE, STATUS_FILE = "sweep.json", "sweep_status.json"  # written by ftjax/sweep.py
# Substrings of metric names that say which way is better (the tasks' own metrics included); a
# name matching neither gets no best.
LOWER_BETTER = ("loss", "ppl") + tasks.metric_directions()[0]
HIGHER_BETTER = ("accura", "reward", "margin", "exact_match") + tasks.metric_directions()[1]
NOT_METRICS = ("step", "time")
DIR = "_dir"  # a row's run directory (not a column)
# Config keys that only pick a seed: runs that differ in nothing else form a group.
SEED_KEYS = ("train.seed", "model.seed", "data.seed")
# eval.json counts: in report.csv, not in the markdown table's default columns.
COUNT_SUFFIXES = ("_k", "_n", "_sem")
COUNT_KEYS = ("loss_examples", "truncated", "dropped")
GROUP_SUFFIXES = ("/lo", "/hi", "/std", "/n", "/k", "/trials")  # of group_seeds' columns


def direction(name: str) -> int:
  """-1 when lower is better, +1 when higher is, 0 when the name does not say."""
  n = name.lower()
  if any(s in n for s in LOWER_BETTER):
    return -1
  if any(s in n for s in HIGHER_BETTER) and not n.endswith("_sem"):
    return 1
  return 0


def find_runs(root: str) -> list[str]:
  """Run directories under `root` (root itself if it is one), sorted; checkpoints not entered."""
  if not os.path.isdir(root):
    raise UserError(f"{root}: no such directory")
  out = []
  for d, subdirs, files in os.walk(root):
    if any(f in files for f in RUN_FILES):
      out.append(d)
      subdirs[:] = []  # a run's checkpoints/ and tensorboard/ are not runs
    subdirs.sort()
  return sorted(out)


def _read_json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}: not JSON ({e.msg})") from None


def summarize(history: list[dict]) -> dict:
  """{"step": last step, "final/m": last value, "best/m": best value} over logged lines."""
  out, best = {}, {}
  for line in history:
    if "step" in line:
      out["step"] = max(out.get("step", 0), int(line["step"]))
    for k, v in line.items():
      if k in NOT_METRICS or not isinstance(v, (int, float)) or isinstance(v, bool):
        continue
      out[f"final/{k}"] = float(v)
      sign = direction(k)
      if sign and math.isfinite(v) and (k not in best or sign * (v - best[k]) > 0):
        best[k] = float(v)
  out.update({f"best/{k}": v for k, v in best.items()})
  return out


def collect(root: str) -> tuple[list[dict], list[str]]:
  """(one row per run under `root`, the swept keys), rows sorted by run name."""
  runs = find_runs(root)
  if not runs:
    raise UserError(f"{root}: no runs (directories with {', '.join(RUN_FILES)})")
  definition = _read_json(os.path.join(root, SWEEP_FILE)) or {}
  swept = list(definition.get("sweeps", {}))
  configs, rows = {}, []
  for d in runs:
    name = os.path.relpath(d, root) if d != root else os.path.basename(os.path.abspath(d))
    config = _read_json(os.path.join(d, "config.json"))
    if config is not None:
      configs[name] = flatten(config)
    status = _read_json(os.path.join(d, STATUS_FILE)) or {}
    row = {"run": name, "status": status.get("status", ""), DIR: d}
    row.update(summarize(read_metrics(d)))
    for k, v in (_read_json(os.path.join(d, "eval.json")) or {}).items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        row[f"measured/{k}"] = float(v)
    rows.append(row)
  # Keys that differ between runs count as swept too (runs made by hand, or added later).
  keys = sorted({k for c in configs.values() for k in c})
  for k in keys:
    values = {json.dumps(c.get(k), sort_keys=True) for c in configs.values()}
    if len(values) > 1 and k not in swept:
      swept.append(k)
  for row in rows:
    c = configs.get(row["run"], {})
    row.update({k: c[k] for k in swept if k in c})
  return rows, swept


def columns(rows: list[dict], swept: list[str]) -> list[str]:
  metric_cols = sorted({k for r in rows for k in r if "/" in k and k.split("/")[0] in
                        ("final", "best", "measured")} - set(swept))
  return ["run", *swept, "status", "step", *metric_cols]


def write_csv(rows: list[dict], swept: list[str], path: str):
  """One row per run; floats as Python writes them (they read back exactly)."""
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, columns(rows, swept), extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: _cell(v) for k, v in r.items()})


def _cell(v):
  return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else v


def default_metrics(rows: list[dict]) -> list[str]:
  """The markdown table's metric columns: losses, DPO rewards and KL, measurements."""
  have = {k for r in rows for k in r}
  out = []
  for m in ("loss", "eval_loss", "eval_ppl", "rewards/accuracies", "rewards/margins",
            "rewards/chosen", "kl/chosen"):
    name = f"eval_{m}" if f"final/eval_{m}" in have and "/" in m else m
    for prefix in ("final", "best"):
      if f"{prefix}/{name}" in have and f"{prefix}/{name}" not in out:
        out.append(f"{prefix}/{name}")
  out += sorted(k for k in have if k.startswith("measured/")
                and not k.endswith(COUNT_SUFFIXES + GROUP_SUFFIXES)
                and k.split("/", 1)[1] not in COUNT_KEYS)
  return out


def markdown(rows: list[dict], swept: list[str], metrics: Optional[list[str]] = None) -> str:
  metrics = metrics or default_metrics(rows)
  cols = ["run", *swept, "step", *metrics]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    cells = []
    for c in cols:
      v = r.get(c, "")
      sem = r.get(c + "_sem")
      cells.append(_fmt(v) + (f" ± {_fmt(sem)}" if isinstance(sem, float) else ""))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _fmt(v) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def _key_value(v):
  """A swept value as a hashable key (a list-valued key such as data.sources as its JSON)."""
  return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def metric_columns(rows: list[dict]) -> list[str]:
  return sorted({k for r in rows for k in r if k.split("/")[0] in ("final", "best", "measured")
                 and not k.endswith(COUNT_SUFFIXES) and isinstance(r[k], float)})


def group_seeds(rows: list[dict], swept: list[str]) -> Optional[tuple[list[dict], list[str]]]:
  """(one row per group of runs that differ only in their seeds, the group keys), or None
  when no two runs do (a single-seed report stays per run).

  A group row has the other swept keys, `n` (its runs), `runs`, and for each metric column `c`
  over the runs that logged it: `c` (the mean), `c/std` (ddof=1), `c/n`, and `c/lo`, `c/hi`:
  a 95% Student t interval of the mean, none with one value. A measured proportion, one whose
  eval.json also gives the counts `<m>_k` and `<m>_n` (eval.py's task metrics), pools the counts
  of its runs: `c` is sum(k) / sum(n), `c/k` and `c/trials` the sums, and `c/lo`, `c/hi` the
  Wilson interval (the std is still the spread of the runs' rates).
  """
  seeds = [k for k in swept if k in SEED_KEYS]
  if not seeds:
    return None
  keys = [k for k in swept if k not in SEED_KEYS]
  buckets: dict = {}
  for r in rows:
    if not any(k in r for k in seeds):  # not a seeded run (the base, a reference): alone
      buckets[("run", r["run"])] = [r]
      continue
    buckets.setdefault(tuple(_key_value(r.get(k)) for k in keys), []).append(r)
  if all(len(rs) < 2 for rs in buckets.values()):
    return None
  metrics = metric_columns(rows)
  groups = []
  for rs in buckets.values():
    g = {k: rs[0][k] for k in keys if k in rs[0]}
    seeded = any(k in rs[0] for k in seeds)
    name = " ".join(f"{k.split('.')[-1]}={_fmt(rs[0][k])}" for k in keys if k in rs[0])
    g.update(group=(name or "all") if seeded else rs[0]["run"], n=len(rs),
             runs=[r["run"] for r in rs])
    for c in metrics:
      have = [r for r in rs if isinstance(r.get(c), float) and math.isfinite(r[c])]
      if not have:
        continue
      vals = [r[c] for r in have]
      g[f"{c}/n"], g[f"{c}/std"] = len(vals), stats.std(vals)
      counts = [(r.get(c + "_k"), r.get(c + "_n")) for r in have]
      if c.startswith("measured/") and all(isinstance(k, float) and isinstance(n, float) and n > 0
                                           for k, n in counts):
        k, n = sum(k for k, _ in counts), sum(n for _, n in counts)
        g[c], g[f"{c}/lo"], g[f"{c}/hi"] = stats.wilson(int(k), int(n))
        g[f"{c}/k"], g[f"{c}/trials"] = int(k), int(n)
      else:
        g[c], g[f"{c}/lo"], g[f"{c}/hi"] = stats.t_interval(vals)
    groups.append(g)
  return sorted(groups, key=lambda g: str(g["group"])), keys


def group_columns(groups: list[dict], keys: list[str]) -> list[str]:
  metric_cols = sorted({k for g in groups for k in g if k.split("/")[0] in
                        ("final", "best", "measured")})
  return ["group", *keys, "n", "runs", *metric_cols]


def write_group_csv(groups: list[dict], keys: list[str], path: str):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, group_columns(groups, keys), extrasaction="ignore")
    w.writeheader()
    for g in groups:
      w.writerow({k: _cell(v) for k, v in g.items()})


def group_markdown(groups: list[dict], keys: list[str],
                   metrics: Optional[list[str]] = None) -> str:
  """One row per group: `mean ± half-width` of the 95% t interval (`p [lo, hi]` for a Wilson
  interval, the value alone for one run), and n."""
  metrics = metrics or default_metrics(groups)
  cols = ["group", *keys, "n", *metrics]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for g in groups:
    cells = []
    for c in cols:
      v = g.get(c, "")
      if c in metrics and isinstance(v, float):
        cells.append(stats.format_interval(v, g.get(f"{c}/lo"), g.get(f"{c}/hi"))
                     + (f" (n={g[c + '/n']})" if g.get(f"{c}/n", g["n"]) != g["n"] else ""))
      else:
        cells.append(_fmt(v))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


GROUP_HEADING = ("Runs that differ only in their seeds, grouped: mean ± half-width of the 95% "
                 "t interval, or rate [95% Wilson interval] of pooled counts; n runs.")


def label(row: dict, swept: list[str]) -> str:
  """`rank=4 lr=0.0001`: the run's swept values under their last key part; else its name."""
  parts = [f"{k.split('.')[-1]}={_fmt(row[k])}" for k in swept if k in row]
  return " ".join(parts) or row["run"]


def metric_column(rows: list[dict], y: str) -> str:
  """`eval_loss` -> `final/eval_loss` (or `measured/...`); a column name is kept."""
  have = {k for r in rows for k in r}
  for c in (y, f"final/{y}", f"measured/{y}"):
    if c in have:
      return c
  names = sorted(k.split("/", 1)[1] for k in have if k.startswith(("final/", "measured/")))
  raise UserError(f"--y={y}: no run logged it; logged: {', '.join(names)}")


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _numeric(values) -> bool:
  try:
    [float(v) for v in values]
    return True
  except (TypeError, ValueError):
    return False


def plot_metric(rows: list[dict], swept: list[str], x: str, y: str, path: str,
                grouped: Optional[tuple[list[dict], list[str]]] = None) -> str:
  """`y` (final value) against the swept key `x`, one line per setting of the other keys. With
  `grouped` (group_seeds' answer) and `x` not a seed, each point is a group's mean with its 95%
  interval as error bars."""
  if x not in swept:
    raise UserError(f"--x={x}: not a swept key; swept: {', '.join(swept) or 'none'}")
  ycol = metric_column(rows, y)
  with_err = grouped is not None and x in grouped[1]
  if with_err:
    rows, swept = grouped[0], grouped[1]
  pts = [r for r in rows if x in r and isinstance(r.get(ycol), float)]
  others = [k for k in swept if k != x]
  groups: dict = {}
  for r in pts:
    key = tuple((k, _key_value(r.get(k))) for k in others)
    groups.setdefault(key, []).append(r)
  xs_all = [r[x] for r in pts]
  numeric = _numeric(xs_all)
  cats = sorted({str(v) for v in xs_all})
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for key, rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
    rs = sorted(rs, key=lambda r: float(r[x]) if numeric else cats.index(str(r[x])))
    xs = [float(r[x]) if numeric else cats.index(str(r[x])) for r in rs]
    name = " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in key) or None
    ys = [r[ycol] for r in rs]
    if with_err:
      # Asymmetric for a Wilson interval; 0 where a group has one run (no interval).
      err = [[y_ - r[f"{ycol}/lo"] if r.get(f"{ycol}/lo") is not None else 0.0
              for y_, r in zip(ys, rs)],
             [r[f"{ycol}/hi"] - y_ if r.get(f"{ycol}/hi") is not None else 0.0
              for y_, r in zip(ys, rs)]]
      ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label=name)
    else:
      ax.plot(xs, ys, "o-", label=name)
  if numeric and xs_all and min(float(v) for v in xs_all) > 0 and \
      max(float(v) for v in xs_all) >= 10 * min(float(v) for v in xs_all):
    ax.set_xscale("log")
  if not numeric:
    ax.set_xticks(range(len(cats)), cats)
  ax.set_xlabel(x)
  ax.set_ylabel(ycol + (" (mean, 95% CI over seeds)" if with_err else ""))
  if others:
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return _save(fig, plt, path)


def plot_curves(root: str, rows: list[dict], swept: list[str], metric: str, path: str):
  """`metric` (and `eval_<metric>`, dashed) against the step, one colour per run."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  drawn = 0
  for i, r in enumerate(rows):
    history = read_metrics(r.get(DIR) or os.path.join(root, r["run"]))
    for name, style in ((metric, "-"), (f"eval_{metric}", "--")):
      pts = [(h["step"], h[name]) for h in history if name in h and "step" in h]
      if pts:
        ax.plot(*zip(*pts), style, marker=".", color=f"C{i % 10}",
                label=label(r, swept) if style == "-" else None)
        drawn += 1
  if not drawn:
    plt.close(fig)
    return None
  ax.set_xlabel("step")
  ax.set_ylabel(f"{metric} (dashed: eval_{metric})")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return _save(fig, plt, path)


def frontier_axes(rows: list[dict]) -> Optional[tuple[str, list[str]]]:
  """(KL column, reward columns) for the DPO frontier, or None when no run has a KL: the
  sampled KL to the reference (`measured/kl`) if measured, else TRL's per-token KL on chosen
  replies; rewards: a measured true reward, and TRL's rewards/chosen and rewards/margins."""
  have = {k for r in rows for k in r}
  kl = next((c for c in ("measured/kl", "final/eval_kl/chosen", "final/kl/chosen") if c in have),
            None)
  if kl is None:
    return None
  ys = [c for c in ("measured/true_reward",) if c in have]
  for m in ("rewards/chosen", "rewards/margins"):
    c = f"final/eval_{m}" if f"final/eval_{m}" in have else f"final/{m}"
    ys += [c] if c in have else []
  return (kl, ys) if ys else None


def plot_frontier(rows: list[dict], swept: list[str], path: str) -> Optional[str]:
  """Each reward against the KL estimate, one point per run (error bars where `_sem` given)."""
  axes = frontier_axes(rows)
  if axes is None:
    return None
  kl, ys = axes
  plt = _pyplot()
  fig, axs = plt.subplots(1, len(ys), figsize=(5 * len(ys), 4), squeeze=False)
  for ax, y in zip(axs[0], ys):
    for r in rows:
      if not isinstance(r.get(kl), float) or not isinstance(r.get(y), float):
        continue
      ax.errorbar(r[kl], r[y], xerr=r.get(kl + "_sem"), yerr=r.get(y + "_sem"), fmt="o",
                  capsize=3, color="C0" if any(k in r for k in swept) else "gray")
      ax.annotate(label(r, swept), (r[kl], r[y]), textcoords="offset points", xytext=(5, 5),
                  fontsize=8)
    ax.set_xlabel(kl + (" (nats per reply)" if kl == "measured/kl" else " (nats per token)"))
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
  fig.suptitle("DPO reward/KL frontier")
  return _save(fig, plt, path)


def _save(fig, plt, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _slug(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9.=-]+", "_", s)


def write_report(root: str, x: Optional[str] = None, y: Optional[str] = None,
                 curve: str = "loss", out: Optional[str] = None,
                 metrics: Optional[list[str]] = None) -> dict:
  """Writes report.csv, report.md and the PNGs into `out` (default `root`), and where runs
  differ only in their seeds report_groups.csv (and their table in report.md); returns
  {"rows", "swept", "groups" and "group_keys" (None without seed groups), and the path of
  each file written}."""
  rows, swept = collect(root)
  grouped = group_seeds(rows, swept)
  out = out or root
  os.makedirs(out, exist_ok=True)
  paths = {"csv": os.path.join(out, "report.csv"), "md": os.path.join(out, "report.md")}
  write_csv(rows, swept, paths["csv"])
  with open(paths["md"], "w") as f:
    f.write(markdown(rows, swept, metrics) + "\n")
    if grouped:
      f.write(f"\n{GROUP_HEADING}\n\n{group_markdown(*grouped, metrics)}\n")
  if grouped:
    paths["groups_csv"] = os.path.join(out, "report_groups.csv")
    write_group_csv(*grouped, paths["groups_csv"])
  x_given, y_given = x, y
  # Over seed groups the x axis is a key the groups differ in (the seeds are the error bars).
  x = x or ((grouped[1] or swept)[0] if grouped else (swept[0] if swept else None))
  if y is None:
    have = {k for r in rows for k in r}
    y = "eval_loss" if "final/eval_loss" in have else "loss"
  if x is not None and (y_given or any(f"final/{y}" in r for r in rows)):
    paths["metric"] = plot_metric(rows, swept, x, y,
                                  os.path.join(out, f"{_slug(y)}_vs_{_slug(x)}.png"), grouped)
  elif x_given:
    raise UserError(f"--x={x}: no run logged {y}; give --y")
  paths["curves"] = plot_curves(root, rows, swept, curve, os.path.join(out, "curves.png"))
  paths["frontier"] = plot_frontier(rows, swept, os.path.join(out, "frontier.png"))
  return {"rows": rows, "swept": swept, "groups": grouped[0] if grouped else None,
          "group_keys": grouped[1] if grouped else None,
          **{k: v for k, v in paths.items() if v}}
