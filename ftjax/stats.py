"""Intervals for results over seeds and over evaluation examples, without scipy.

`t_interval` is the Student t confidence interval of a mean (runs that differ only in their
seed); `wilson` is the Wilson score interval of a proportion k/n (replies that invented an order
number, out of those scored). `format_proportion` writes `invented 1/120 (0.8%, 95% CI 0.1-4.6%)`.
Both agree with scipy.stats (tests/test_stats.py); they are written out here so that the
package does not need scipy at run time, and because scipy's t.ppf is the one piece needed.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence


def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction of the regularized incomplete beta (modified Lentz)."""
  tiny, eps = 1e-300, 1e-15
  qab, qap, qam = a + b, a + 1.0, a - 1.0
  c, d = 1.0, 1.0 - qab * x / qap
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 1000):
    m2 = 2 * m
    for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
               -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
      d = 1.0 + aa * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + aa / c
      c = c if abs(c) > tiny else tiny
      h *= d * c
    if abs(d * c - 1.0) < eps:
      break
  return h


def betainc(a: float, b: float, x: float) -> float:
  """The regularized incomplete beta function I_x(a, b)."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                   + a * math.log(x) + b * math.log1p(-x))
  if x < (a + 1.0) / (a + b + 2.0):
    return front * _betacf(a, b, x) / a
  return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
  """P(T > t) for Student's t with `df` degrees of freedom, t >= 0."""
  return 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))


def t_ppf(q: float, df: float) -> float:
  """The q-quantile (q in (0.5, 1)) of Student's t, by bisection on its tail."""
  if not 0.5 < q < 1.0:
    raise ValueError(f"t_ppf: q={q} must be in (0.5, 1)")
  tail = 1.0 - q
  lo, hi = 0.0, 1.0
  while t_sf(hi, df) > tail:
    lo, hi = hi, 2.0 * hi
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if t_sf(mid, df) > tail:
      lo = mid
    else:
      hi = mid
    if hi - lo <= 1e-14 * hi:
      break
  return 0.5 * (lo + hi)


def _check_conf(conf: float):
  if not 0.0 < conf < 1.0:
    raise ValueError(f"conf={conf}: a confidence level is in (0, 1)")


def t_interval(values: Sequence[float], conf: float = 0.95
               ) -> tuple[float, Optional[float], Optional[float]]:
  """(mean, lo, hi): the Student t interval of the mean of `values` at `conf`. With one value
  there is no spread to estimate: (value, None, None)."""
  _check_conf(conf)
  xs = [float(v) for v in values]
  if not xs:
    raise ValueError("t_interval: no values")
  mean = math.fsum(xs) / len(xs)
  if len(xs) < 2:
    return mean, None, None
  half = t_ppf(0.5 + conf / 2.0, len(xs) - 1) * std(xs) / math.sqrt(len(xs))
  return mean, mean - half, mean + half


def std(values: Sequence[float]) -> Optional[float]:
  """The sample standard deviation (ddof=1); None for fewer than two values."""
  xs = [float(v) for v in values]
  return statistics.stdev(xs) if len(xs) >= 2 else None


def wilson(k: int, n: int, conf: float = 0.95) -> tuple[float, float, float]:
  """(k / n, lo, hi): the Wilson score interval of a proportion, k successes in n trials."""
  _check_conf(conf)
  if n <= 0 or not 0 <= k <= n or int(k) != k or int(n) != n:
    raise ValueError(f"wilson: need 0 <= k <= n and n >= 1, got k={k}, n={n}")
  z = statistics.NormalDist().inv_cdf(0.5 + conf / 2.0)
  p = k / n
  denom = 1.0 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  # At k=0 and k=n the exact bound is 0 (1); rounding would leave 1e-17 on the wrong side.
  return p, (0.0 if k == 0 else max(0.0, center - half)), \
      (1.0 if k == n else min(1.0, center + half))


def format_proportion(name: str, k: int, n: int, conf: float = 0.95) -> str:
  """`invented 1/120 (0.8%, 95% CI 0.1-4.6%)`: counts, the rate and its Wilson interval."""
  p, lo, hi = wilson(k, n, conf)
  return (f"{name} {int(k)}/{int(n)} ({_pct(p)}%, {100 * conf:g}% CI "
          f"{_pct(lo)}-{_pct(hi)}%)")


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def format_interval(mean: float, lo: Optional[float], hi: Optional[float],
                    fmt: str = ".4g") -> str:
  """`mean ± half-width` of a symmetric (t) interval; `p [lo, hi]` when it is not symmetric
  (Wilson); the mean alone when there is no interval (n=1)."""
  if lo is None or hi is None:
    return format(mean, fmt)
  half = (hi - lo) / 2
  if abs((mean - lo) - (hi - mean)) <= 1e-9 * max(1.0, abs(half)):
    return f"{mean:{fmt}} ± {half:{fmt}}"
  return f"{mean:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def add_wilson(metrics: dict, conf: float = 0.95) -> dict:
  """`metrics` with `<m>_ci95: [lo, hi]` (the Wilson interval) for every rate `<m>` that comes
  with its counts `<m>_k` and `<m>_n` (what ftjax.evaluation.generation_metrics gives)."""
  out = {}
  for key, v in metrics.items():
    out[key] = v
    m = key.removesuffix("_n")
    k, n = metrics.get(f"{m}_k"), metrics.get(f"{m}_n")
    if key.endswith("_n") and m in metrics and isinstance(k, int) and isinstance(n, int) and n > 0:
      out[f"{m}_ci95"] = list(wilson(k, n, conf)[1:])  # next to its counts
  return out


def proportion_lines(metrics: dict, conf: float = 0.95) -> list[str]:
  """`format_proportion` of every rate in `metrics` that has its counts `<m>_k`, `<m>_n`."""
  return [format_proportion(m, metrics[f"{m}_k"], metrics[f"{m}_n"], conf) for m in metrics
          if isinstance(metrics.get(f"{m}_k"), int) and metrics.get(f"{m}_n")]
