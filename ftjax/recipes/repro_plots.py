"""The reproductions' own plots (ftjax/recipes/repro.py): metrics of each run against a measure,
or as bars, from report.py's rows (`measured/<k>` columns)."""

from __future__ import annotations

import math

from ftjax import report


def _value(row: dict, key: str):
  v = row.get(f"measured/{key}", row.get(key))
  return v if isinstance(v, float) and math.isfinite(v) else None


def points(rows: list[dict], x: str, ys: list[str], path: str, logx: bool = False,
           title: str = "") -> str:
  """One panel per `ys` metric against `x`, each run a labelled point; the untrained base (the
  run named `base`) is a grey star, or a dashed line where it has no place on the x axis."""
  plt = report._pyplot()
  fig, axs = plt.subplots(1, len(ys), figsize=(5.2 * len(ys), 4), squeeze=False)
  for ax, y in zip(axs[0], ys):
    for i, r in enumerate(rows):
      xv, yv = _value(r, x), _value(r, y)
      if yv is None:
        continue
      is_base = r["run"] == "base"
      if xv is None or (logx and xv <= 0):
        if is_base:
          ax.axhline(yv, color="gray", ls="--", lw=1, label="base (before)")
        continue
      ax.plot(xv, yv, "*" if is_base else "o", ms=12 if is_base else 7,
              color="gray" if is_base else f"C{i % 10}")
      ax.annotate("base (before)" if is_base else r["run"], (xv, yv),
                  textcoords="offset points", xytext=(5, 5), fontsize=8)
    if logx:
      ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle(title)
  return report._save(fig, plt, path)


def bars(rows: list[dict], y: str, path: str, title: str = "") -> str:
  """`y` per run as bars, each labelled with its value."""
  plt = report._pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  pts = [(r["run"], _value(r, y)) for r in rows if _value(r, y) is not None]
  names, vals = [n for n, _ in pts], [v for _, v in pts]
  colors = ["gray" if n == "base" else f"C{i % 10}" for i, n in enumerate(names)]
  ax.bar(range(len(vals)), vals, color=colors)
  for i, v in enumerate(vals):
    ax.annotate(f"{v:.4f}", (i, v), ha="center", textcoords="offset points", xytext=(0, 3),
                fontsize=8)
  ax.set_xticks(range(len(names)), [("base (before)" if n == "base" else n) for n in names])
  ax.set_ylabel(y)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3, axis="y")
  return report._save(fig, plt, path)
