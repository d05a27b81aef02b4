"""ftjax.stats against scipy.stats: the t interval of a mean and the Wilson interval."""

import numpy as np
import pytest
import scipy.stats

from ftjax import stats


@pytest.mark.parametrize("values", [[1.0, 2.0], [0.3, 0.5, 0.4], [5.0, 5.0, 5.0, 5.1],
                                    list(np.random.default_rng(0).normal(2, 3, 7)),
                                    list(np.random.default_rng(1).uniform(0, 1, 40))])
@pytest.mark.parametrize("conf", [0.95, 0.9, 0.99])
def test_t_interval_matches_scipy(values, conf):
  mean, lo, hi = stats.t_interval(values, conf)
  n = len(values)
  ref = scipy.stats.t.interval(conf, n - 1, loc=np.mean(values), scale=scipy.stats.sem(values))
  assert mean == pytest.approx(np.mean(values), rel=1e-12)
  np.testing.assert_allclose([lo, hi], ref, rtol=1e-9, atol=1e-12)
  assert stats.std(values) == pytest.approx(np.std(values, ddof=1), rel=1e-12)


def test_t_interval_of_one_value_has_no_interval():
  assert stats.t_interval([0.7]) == (0.7, None, None)
  assert stats.std([0.7]) is None
  assert stats.format_interval(0.7, None, None) == "0.7"
  with pytest.raises(ValueError, match="no values"):
    stats.t_interval([])


@pytest.mark.parametrize("df", [1, 2, 3, 7, 30, 500])
def test_t_quantiles_match_scipy(df):
  for q in (0.8, 0.95, 0.975, 0.995, 0.9995):
    assert stats.t_ppf(q, df) == pytest.approx(scipy.stats.t.ppf(q, df), rel=1e-9)


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (10, 10), (3, 7), (1, 120),
                                 (60, 120), (119, 120), (2, 48)])
@pytest.mark.parametrize("conf", [0.95, 0.8])
def test_wilson_matches_scipy(k, n, conf):
  p, lo, hi = stats.wilson(k, n, conf)
  ci = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
  assert p == k / n
  np.testing.assert_allclose([lo, hi], [ci.low, ci.high], rtol=1e-9, atol=1e-12)
  assert 0.0 <= lo <= p <= hi <= 1.0


def test_wilson_refuses_impossible_counts():
  for k, n in ((0, 0), (3, 2), (-1, 4)):
    with pytest.raises(ValueError, match="wilson"):
      stats.wilson(k, n)


def test_format_proportion_and_interval():
  assert stats.format_proportion("invented", 1, 120) == "invented 1/120 (0.8%, 95% CI 0.1-4.6%)"
  assert stats.format_proportion("voice", 48, 48).startswith("voice 48/48 (100.0%, 95% CI 92.6-")
  mean, lo, hi = stats.t_interval([1.0, 2.0, 3.0])
  assert stats.format_interval(mean, lo, hi) == f"2 ± {(hi - lo) / 2:.4g}"
  assert stats.format_interval(*stats.wilson(1, 120)) == "0.008333 [0.001473, 0.0457]"


def test_add_wilson_and_proportion_lines():
  m = {"exact_match": 0.25, "exact_match_k": 2, "exact_match_n": 8, "details": float("nan"),
       "details_k": 0, "details_n": 0, "eval_loss": 1.5}
  out = stats.add_wilson(m)
  ci = scipy.stats.binomtest(2, 8).proportion_ci(method="wilson")
  np.testing.assert_allclose(out["exact_match_ci95"], [ci.low, ci.high], rtol=1e-9)
  assert "details_ci95" not in out and all(out[k] is m[k] for k in m)  # the keys kept
  assert list(out).index("exact_match_ci95") == list(out).index("exact_match_n") + 1
  assert stats.proportion_lines(out) == [stats.format_proportion("exact_match", 2, 8)]
