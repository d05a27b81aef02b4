"""Seeded arms of a reproduction (ftjax/recipes/repro.py): per-arm tables with intervals, the
claim's verdict computed from them, and error-bar plots.

Every arm runs once per seed (train.seed = model.seed = data.seed = s). An arm's row gives, over
its seeds, the mean and the half-width of the 95% Student t interval of each continuous measure
(held-out loss, perplexity, task score), and each proportion (order details quoted, ...) as the
counts pooled over seeds with their 95% Wilson interval (ftjax/stats.py).

A claim is a list of `Part`s. Each part is a linear contrast of arm means on one measure, taken
per seed (arms paired by seed: the same seed gives the same data order), e.g.
score(rank=4) - score(rank=64); its 95% t interval over seeds decides the part:
  greater:     holds where the interval lies above `margin`, does not hold where it lies at or
               below it (entirely), inconclusive otherwise;
  noninferior: holds where it lies above -`margin` (a no worse than b by more than the margin),
               does not hold where it lies below -`margin`, inconclusive otherwise;
  equivalent:  holds where it lies inside (-margin, margin), does not hold where it lies
               entirely outside, inconclusive otherwise.
With one seed there is no interval: every part is inconclusive. The claim holds where every
part holds, does not hold where any part does not hold, and is inconclusive otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from ftjax import stats

RATES = ("details", "invented", "escalation_ok", "voice")  # counts in eval.json: <m>_k, <m>_n
SEED_SEP = ",seed="  # run name: <arm>,seed=<s>


def arm_of(run_name: str) -> tuple[str, Optional[int]]:
  """(arm, seed) of a run name `<arm>,seed=<s>` (seed None for an unseeded run: the base)."""
  if SEED_SEP in run_name:
    arm, seed = run_name.rsplit(SEED_SEP, 1)
    return arm, int(seed)
  return run_name, None


def by_arm(evals: dict[str, dict]) -> dict[str, dict[int, dict]]:
  """{arm: {seed: eval.json}} from {run name: eval.json}; the unseeded base is seed -1."""
  out: dict[str, dict[int, dict]] = {}
  for name, m in evals.items():
    arm, seed = arm_of(name)
    out.setdefault(arm, {})[-1 if seed is None else seed] = m
  return out


@dataclasses.dataclass(frozen=True)
class Part:
  """One testable part of a claim: sum(coef * metric(arm)) per seed, positive where the
  claim's direction holds (write lower-is-better metrics with the signs swapped)."""
  sentence: str
  metric: str
  terms: tuple  # ((arm, coef), ...)
  rule: str = "greater"  # greater | noninferior | equivalent
  margin: float = 0.0

  def expression(self) -> str:
    out = ""
    for arm, coef in self.terms:
      sign = "-" if coef < 0 else ("+" if out else "")
      c = abs(coef)
      out += f" {sign} " if out else sign
      out += (f"{c:g}*" if c != 1 else "") + f"{self.metric}({arm})"
    return out.strip()


def contrast(arms: dict[str, dict[int, dict]], part: Part) -> list[float]:
  """The part's contrast per seed that every one of its arms has."""
  seeds = sorted(set.intersection(*(set(arms.get(a, {})) for a, _ in part.terms)) - {-1})
  return [math.fsum(c * float(arms[a][s][part.metric]) for a, c in part.terms) for s in seeds]


def decide(part: Part, lo: Optional[float], hi: Optional[float]) -> str:
  """holds | does not hold | inconclusive: the rule of `part` on the interval [lo, hi]."""
  if lo is None or hi is None:
    return "inconclusive"
  m = part.margin
  if part.rule == "greater":
    return "holds" if lo > m else "does not hold" if hi <= m else "inconclusive"
  if part.rule == "noninferior":
    return "holds" if lo > -m else "does not hold" if hi < -m else "inconclusive"
  if part.rule == "equivalent":
    return ("holds" if -m < lo and hi < m else
            "does not hold" if lo >= m or hi <= -m else "inconclusive")
  raise ValueError(f"Part.rule={part.rule!r}: expected greater, noninferior or equivalent")


RULE_TEXT = {"greater": "holds if the 95% t interval lies above {m}",
             "noninferior": "holds if the 95% t interval lies above -{m}",
             "equivalent": "holds if the 95% t interval lies inside ±{m}"}


def verdict(arms: dict[str, dict[int, dict]], parts: Sequence[Part]) -> tuple[str, list[dict]]:
  """(the claim's verdict, per part {sentence, expression, values, mean, lo, hi, word})."""
  out = []
  for p in parts:
    vals = contrast(arms, p)
    mean, lo, hi = stats.t_interval(vals) if vals else (float("nan"), None, None)
    out.append({"sentence": p.sentence, "expression": p.expression(), "values": vals,
                "mean": mean, "lo": lo, "hi": hi, "word": decide(p, lo, hi),
                "rule": RULE_TEXT[p.rule].format(m=f"{p.margin:g}")})
  words = [r["word"] for r in out]
  word = ("holds" if words and all(w == "holds" for w in words) else
          "does not hold" if "does not hold" in words else "inconclusive")
  return word, out


def verdict_lines(word: str, parts: list[dict]) -> list[str]:
  lines = [f"**Verdict at this scale: {word}.** Per part (arms paired by seed; the contrast "
           "per seed, its mean and 95% t interval, and the rule):", ""]
  for r in parts:
    ci = ("no interval (one seed)" if r["lo"] is None else
          f"95% CI [{r['lo']:+.4f}, {r['hi']:+.4f}]")
    per_seed = ", ".join(f"{v:+.4f}" for v in r["values"])
    lines.append(f"- {r['sentence']}: `{r['expression']}` = {r['mean']:+.4f} ({ci}; seeds: "
                 f"{per_seed}); {r['rule']}: **{r['word']}**.")
  return lines


# ---------------------------------------------------------------- the per-arm table

def mean_ci(values: Sequence[float]) -> tuple[float, Optional[float], Optional[float]]:
  return stats.t_interval(values)


def fmt_mean(values: Sequence[float], fmt: str = ".4g") -> str:
  """`mean ± half-width` (95% t) over seeds; the value alone for one seed."""
  vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  if not vals:
    return "-"
  return stats.format_interval(*stats.t_interval(vals), fmt=fmt)


def pooled(seeds: dict[int, dict], rate: str) -> tuple[int, int]:
  """(k, n) of a rate summed over the seeds."""
  k = sum(int(m.get(f"{rate}_k", 0)) for m in seeds.values())
  n = sum(int(m.get(f"{rate}_n", 0)) for m in seeds.values())
  return k, n


def fmt_rate(k: int, n: int) -> str:
  if not n:
    return "-"
  p, lo, hi = stats.wilson(k, n)
  return f"{k}/{n} ({100 * p:.1f}%, {100 * lo:.1f}-{100 * hi:.1f}%)"


def table(arms: dict[str, dict[int, dict]], order: Sequence[str], means: Sequence[str],
          rates: Sequence[str] = RATES, extra: Optional[dict] = None) -> list[str]:
  """Markdown lines: one row per arm: seeds, each `means` measure as mean ± half-width (95% t
  over seeds), each rate as pooled counts (rate, 95% Wilson interval)."""
  extra = extra or {}
  cols = ["arm", "seeds", *extra, *means, *rates]
  lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
  for arm in order:
    seeds = arms.get(arm)
    if not seeds:
      continue
    cells = [arm, "-" if -1 in seeds else str(len(seeds))]
    cells += [str(f(arm, seeds)) for f in extra.values()]
    cells += [fmt_mean([m.get(k) for m in seeds.values()]) for k in means]
    cells += [fmt_rate(*pooled(seeds, r)) for r in rates]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


# ---------------------------------------------------------------- plots with error bars

def _err(values):
  mean, lo, hi = stats.t_interval(values)
  return mean, (None if lo is None else [[mean - lo], [hi - mean]])


PALETTE = (0, 1, 2, 3, 4, 5, 6, 8, 9)  # matplotlib's cycle without C7, its grey: the base's


def errorbars(arms: dict[str, dict[int, dict]], order: Sequence[str], x: Optional[str],
              ys: Sequence[str], path: str, logx: bool = False, title: str = "",
              xlabel: Optional[str] = None) -> str:
  """One panel per `ys` measure: each arm's mean over seeds with its 95% t interval (bars), its
  seeds as small dots; against `x` (a measure: x error bars too) or, with x None, one column
  per arm. The base (seed -1) is a grey star, or a dashed line where it has no x."""
  from ftjax import report
  plt = report._pyplot()
  fig, axs = plt.subplots(1, len(ys), figsize=(5.4 * len(ys), 4.2), squeeze=False)
  for ax, y in zip(axs[0], ys):
    for i, arm in enumerate(a for a in order if arms.get(a)):
      seeds = arms[arm]
      yv = [float(m[y]) for m in seeds.values() if m.get(y) is not None]
      if not yv:
        continue
      base = -1 in seeds
      color = "gray" if base else f"C{PALETTE[i % len(PALETTE)]}"
      if x is None:
        xv = [float(i)] * len(yv)
      else:
        xv = [float(m[x]) for m in seeds.values() if m.get(x) is not None]
      if x is not None and (not xv or (logx and min(xv) <= 0)):
        if base:
          ax.axhline(yv[0], color="gray", ls="--", lw=1, label=f"{arm} (before)")
        continue
      ym, yerr = _err(yv)
      xm, xerr = _err(xv)
      ax.errorbar([xm], [ym], yerr=yerr, xerr=None if x is None else xerr,
                  fmt="*" if base else "o", ms=11 if base else 6, color=color, capsize=4)
      if len(yv) > 1:
        ax.plot(xv, yv, ".", color=color, alpha=0.45, ms=4)
      # staggered labels: arms with close means would print over each other
      ax.annotate(f"{arm} (before)" if base else arm, (xm, ym), textcoords="offset points",
                  xytext=(5, 4 + 9 * (i % 3)), fontsize=8)
    if x is None:
      names = [a for a in order if arms.get(a)]
      ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    else:
      ax.set_xlabel(xlabel or x)
    if logx:
      ax.set_xscale("log")
      ax.xaxis.set_minor_formatter(plt.NullFormatter())  # labels on the decades only
    ax.set_ylabel(f"{y} (mean, 95% t CI over seeds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  return report._save(fig, plt, path)
