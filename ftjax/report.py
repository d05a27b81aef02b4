"""Reports over runs: final and best metrics of every workdir under a root, as CSV, markdown
and matplotlib plots (a metric against a swept key, loss curves, the DPO reward/KL frontier).

A run is a directory holding `config.json`, `metrics.jsonl` or `eval.json`; its row has the
swept keys (those of the root's `sweep.json`, and any other config key whose value differs
between runs), its status (from sweep.py), the last logged step, and for each logged metric `m`
`final/m` (its last logged value) and, where the name says which way is better (a loss, an
accuracy, a reward, ...), `best/m` (the best logged value). `eval.json` holds measurements of
the finished run (what `experiments/eval.py --out=WORKDIR/eval.json` writes, or the β study's
sampled reward and KL): they become `measured/k`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from typing import Optional

from ftjax.errors import UserError
from ftjax.provenance import flatten

RUN_FILES = ("config.json", "metrics.jsonl", "eval.json")
SWEEP_FILE, STATUS_FILE = "sweep.json", "sweep_status.json"  # written by ftjax/sweep.py
# Substrings of metric names that say which way is better; a name matching neither gets no best.
LOWER_BETTER = ("loss", "ppl", "invented")
HIGHER_BETTER = ("accura", "reward", "margin", "exact_match", "details", "escalation_ok", "voice")
NOT_METRICS = ("step", "time")


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


def read_metrics(path: str) -> list[dict]:
  """The lines of a metrics.jsonl (NaN/Infinity read as floats); a bad line is a UserError."""
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {i}: not JSON ({e.msg})") from None
  return rows


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
    row = {"run": name, "status": status.get("status", "")}
    row.update(summarize(read_metrics(os.path.join(d, "metrics.jsonl"))))
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
  out += sorted(k for k in have if k.startswith("measured/") and not k.endswith("_sem"))
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


def plot_metric(rows: list[dict], swept: list[str], x: str, y: str, path: str) -> str:
  """`y` (final value) against the swept key `x`, one line per setting of the other keys."""
  if x not in swept:
    raise UserError(f"--x={x}: not a swept key; swept: {', '.join(swept) or 'none'}")
  ycol = metric_column(rows, y)
  pts = [r for r in rows if x in r and isinstance(r.get(ycol), float)]
  others = [k for k in swept if k != x]
  groups: dict = {}
  for r in pts:
    # A list-valued key (data.sources) cannot be a dict key; its JSON can.
    key = tuple((k, json.dumps(r.get(k), sort_keys=True) if isinstance(r.get(k), (list, dict))
                 else r.get(k)) for k in others)
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
    ax.plot(xs, [r[ycol] for r in rs], "o-", label=name)
  if numeric and xs_all and min(float(v) for v in xs_all) > 0 and \
      max(float(v) for v in xs_all) >= 10 * min(float(v) for v in xs_all):
    ax.set_xscale("log")
  if not numeric:
    ax.set_xticks(range(len(cats)), cats)
  ax.set_xlabel(x)
  ax.set_ylabel(ycol)
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
    history = read_metrics(os.path.join(root, r["run"], "metrics.jsonl"))
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
  """Writes report.csv, report.md and the PNGs into `out` (default `root`); returns
  {"rows", "swept", and the path of each file written}."""
  rows, swept = collect(root)
  out = out or root
  os.makedirs(out, exist_ok=True)
  paths = {"csv": os.path.join(out, "report.csv"), "md": os.path.join(out, "report.md")}
  write_csv(rows, swept, paths["csv"])
  with open(paths["md"], "w") as f:
    f.write(markdown(rows, swept, metrics) + "\n")
  x_given, y_given = x, y
  x = x or (swept[0] if swept else None)
  if y is None:
    have = {k for r in rows for k in r}
    y = "eval_loss" if "final/eval_loss" in have else "loss"
  if x is not None and (y_given or any(f"final/{y}" in r for r in rows)):
    paths["metric"] = plot_metric(rows, swept, x, y,
                                  os.path.join(out, f"{_slug(y)}_vs_{_slug(x)}.png"))
  elif x_given:
    raise UserError(f"--x={x}: no run logged {y}; give --y")
  paths["curves"] = plot_curves(root, rows, swept, curve, os.path.join(out, "curves.png"))
  paths["frontier"] = plot_frontier(rows, swept, os.path.join(out, "frontier.png"))
  return {"rows": rows, "swept": swept, **{k: v for k, v in paths.items() if v}}
