"""PRM vs ORM vs majority vote for best-of-N (Lightman et al. 2023, "Let's Verify Step by Step",
figure 3), at CPU scale on column addition.

  python experiments/prm_vs_orm.py --workdir=/tmp/prm_vs_orm      # 3 seeds, N = 1..32
  python experiments/prm_vs_orm.py --workdir=/tmp/p --smoke       # the pipeline in seconds

Per seed: a process reward model (experiments/prm.py's trainer, `configs/prm.py:task=arithmetic`)
and an outcome reward model on the same solutions (the same config with
`prm.train_on_last_step_only`: only the final label, i.e. whether the answer is right), both the
`tiny` preset from scratch. Then, on held-out problems (operand pairs never trained on), a noisy
solver (`tasks.arithmetic.sample_solutions`: each column slips with probability `step_error`)
writes N_MAX solutions per problem. For each N, best-of-N picks one of N of them by the PRM
(product of its steps' P(good), as Lightman et al.), by the ORM (its final step's P(good)), or
by majority vote over the final answers (ties: the answer seen first); pass@1 is the fraction of
problems whose pick is right, averaged over `subsets` random N-subsets of the N_MAX samples per
problem (as the paper's figure). Reported: per N and method the mean over seeds and its spread
(its 95% t interval, min..max), a table, a plot with error bars, and the verdict at N = N_MAX
from the PRM's gaps to the ORM and to majority voting, paired by seed: holds where both 95%
t intervals lie above 0, does not hold where one lies below 0, inconclusive otherwise.

The solver's slips are of `kinds` (a dropped carry by default): the ones a `tiny` model learns
to see within the step budget (a miscopied digit takes far longer from scratch).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Optional, Sequence

import numpy as np

from ftjax import stats
from ftjax.recipes import REPO, get_config

CLAIM = ("Best-of-N selected by a process reward model beats an outcome reward model trained on "
         "the same solutions and majority voting, at N = {n} (Lightman et al. 2023, figure 3).")
METHODS = ("prm", "orm", "majority")


def settings(smoke: bool = False, seeds: int = 3, steps: int = 0) -> dict:
  """The study's knobs; `smoke` shrinks everything to check the pipeline only."""
  s = dict(seeds=seeds, steps=steps or 600, train_rows=4000, eval_rows=200, max_operand=999,
           kinds=("carry",), error_fraction=0.8, problems=200, n_max=32, subsets=16,
           step_error=0.25)
  if smoke:
    s.update(seeds=min(seeds, 1), steps=steps or 2, train_rows=64, eval_rows=16, problems=3,
             n_max=4, subsets=2)
  return s


def rm_config(s: dict, seed: int, outcome: bool):
  """configs/prm.py:task=arithmetic with the study's rows and steps; `outcome`: the ORM."""
  c = get_config("prm", "task=arithmetic")
  c.train.update(seed=seed, steps=int(s["steps"]), log_every=50, eval_every=int(s["steps"]),
                 save_every=int(s["steps"]), async_save=False)
  c.model.seed = seed
  c.prm.update(train_rows=s["train_rows"], eval_rows=s["eval_rows"],
               max_operand=s["max_operand"], error_kinds=",".join(s["kinds"]),
               error_fraction=s["error_fraction"], train_on_last_step_only=outcome)
  return c


def majority(answers: Sequence) -> int:
  """Index of the first candidate holding the most common answer (None answers never win
  unless every answer is None)."""
  counts = Counter(a for a in answers if a is not None)
  if not counts:
    return 0
  best = max(counts.values())
  return next(i for i, a in enumerate(answers) if a is not None and counts[a] == best)


def best_of_n(correct: np.ndarray, scores: dict, answers: list, n: int, subsets: int,
              rng: np.random.Generator) -> dict:
  """pass@1 of each method's pick among `subsets` random n-subsets of every problem's samples.

  correct: bool [P, N_MAX]; scores: method -> float [P, N_MAX] (higher is better; first wins
  ties); answers: P lists of N_MAX final answers (majority vote)."""
  p, n_max = correct.shape
  hits = {m: 0.0 for m in METHODS}
  for i in range(p):
    for _ in range(subsets):
      idx = rng.choice(n_max, n, replace=False) if n < n_max else np.arange(n_max)
      for m in ("prm", "orm"):
        hits[m] += correct[i, idx[int(np.argmax(scores[m][i, idx]))]]
      hits["majority"] += correct[i, idx[majority([answers[i][j] for j in idx])]]
  return {m: float(v) / (p * subsets) for m, v in hits.items()}


def score_samples(workdir: str, problems: list, samples: list, how: str) -> np.ndarray:
  """float [P, N_MAX]: each sample's score by the reward model in `workdir` (`prm.aggregate`)."""
  from ftjax.train import prm
  scorer = prm.StepScorer(workdir, batch_size=64)
  prompts = [p for p, cands in zip(problems, samples) for _ in cands]
  sols = [steps for cands in samples for steps, _ in cands]
  flat = [prm.aggregate(s, how) for s in scorer(prompts, sols)]
  flat = [-np.inf if v is None else v for v in flat]
  return np.asarray(flat, np.float64).reshape(len(samples), -1)


def run_seed(root: str, s: dict, seed: int) -> dict:
  """Both reward models of one seed, their held-out step metrics and the best-of-N curves."""
  from ftjax import model_card
  from ftjax.tasks import arithmetic
  from ftjax.train import prm
  out = {"seed": seed}
  for name, outcome in (("prm", False), ("orm", True)):
    w = os.path.join(root, f"seed{seed}", name)
    c = rm_config(s, seed, outcome)
    if outcome:  # the PRM's tokenizer (trained on the same texts): the same tokens for both
      c.model.tokenizer = os.path.join(root, f"seed{seed}", "prm", "tokenizer")
    prm.run(c, w)  # a finished run (a rerun of the study) resumes at its end: nothing to do
    m = model_card.last_eval(w)
    out[f"{name}_eval"] = {k: m[k] for k in ("eval_accuracy", "eval_bad_f1") if k in m}
  rows = arithmetic.rows("eval", s["problems"], seed, s["max_operand"])
  rng = np.random.default_rng([seed, 0x626f6e])
  problems, samples, answers, correct = [], [], [], []
  for r in rows:
    a, b = (int(x) for x in r["prompt"][:-1].split("+"))
    cands = arithmetic.sample_solutions(a, b, s["n_max"], rng, s["step_error"], s["kinds"])
    problems.append(r["prompt"])
    samples.append(cands)
    answers.append([arithmetic.step_answer(steps) for steps, _ in cands])
    correct.append([ans == a + b for ans in answers[-1]])
  correct = np.asarray(correct, bool)
  scores = {"prm": score_samples(os.path.join(root, f"seed{seed}", "prm"), problems, samples,
                                 "prod"),
            "orm": score_samples(os.path.join(root, f"seed{seed}", "orm"), problems, samples,
                                 "last")}
  ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= s["n_max"]]
  out["sample_accuracy"] = float(correct.mean())
  out["curve"] = {n: best_of_n(correct, scores, answers, n, s["subsets"],
                               np.random.default_rng([seed, n])) for n in ns}
  return out


def summarize(results: list[dict]) -> dict:
  """Per N and method: mean over seeds, min, max and the sample standard deviation."""
  ns = sorted({int(n) for r in results for n in r["curve"]})
  out = {}
  for n in ns:
    for m in METHODS:
      v = np.asarray([r["curve"][n][m] for r in results])
      _, lo, hi = stats.t_interval(v)
      out[(n, m)] = dict(mean=float(v.mean()), min=float(v.min()), max=float(v.max()),
                         std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                         lo=v.min() if lo is None else lo, hi=v.max() if hi is None else hi)
  return out


def paired_gaps(results: list[dict], n: int) -> dict:
  """At N = n, the PRM's pass@1 minus each other method's, paired by seed: (mean, lo, hi) of
  the 95% t interval (lo/hi None with one seed)."""
  return {m: stats.t_interval([r["curve"][n]["prm"] - r["curve"][n][m] for r in results])
          for m in METHODS if m != "prm"}


def verdict(results: list[dict]) -> tuple[bool, str]:
  """At N = N_MAX: holds when the PRM's paired gap to every other method has its whole 95% t
  interval above 0; does not hold when one lies below 0; else inconclusive."""
  n = max(int(k) for k in results[0]["curve"])
  wins = [r["curve"][n]["prm"] > max(r["curve"][n]["orm"], r["curve"][n]["majority"])
          for r in results]
  gaps = paired_gaps(results, n)
  above = [g[1] is not None and g[1] > 0 for g in gaps.values()]
  below = [g[2] is not None and g[2] < 0 for g in gaps.values()]
  held = all(above)
  word = "Holds" if held else "Does not hold" if any(below) else "Inconclusive"
  parts = "; ".join(
      f"PRM - {m} {g[0]:+.3f}" + ("" if g[1] is None else f" (95% t CI {g[1]:+.3f}..{g[2]:+.3f}, "
                                  + ("above 0" if g[1] > 0 else "below 0" if g[2] < 0
                                     else "includes 0") + ")")
      for m, g in gaps.items())
  return held, (f"{word} at this scale. Paired by seed, at N = {n}: {parts}. The PRM's pick is "
                f"best in {sum(wins)} of {len(wins)} seeds.")


def write_outputs(out: str, s: dict, results: list[dict], seconds: float, command: str) -> str:
  """README.md (claim, setup, table, plot, verdict), results.json and curve.png in `out`."""
  os.makedirs(out, exist_ok=True)
  summary = summarize(results)
  ns = sorted({n for n, _ in summary})
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
               "seeds": results, "seconds": seconds}, f, indent=2, default=str)
  lines = ["| N | " + " | ".join(f"{m} pass@1 (mean [95% t CI], min..max)" for m in METHODS)
           + " |", "|---|" + "---|" * len(METHODS)]
  for n in ns:
    cells = [f"{summary[(n, m)]['mean']:.3f} [{summary[(n, m)]['lo']:.3f}, "
             f"{summary[(n, m)]['hi']:.3f}] ({summary[(n, m)]['min']:.3f}.."
             f"{summary[(n, m)]['max']:.3f})" for m in METHODS]
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  evals = ["| seed | PRM step accuracy | PRM bad-step F1 | ORM step accuracy | ORM bad-step F1 | "
           "sample accuracy |", "|---|---|---|---|---|---|"]
  for r in results:
    p, o = r["prm_eval"], r["orm_eval"]
    evals.append(f"| {r['seed']} | {p.get('eval_accuracy', float('nan')):.3f} | "
                 f"{p.get('eval_bad_f1', float('nan')):.3f} | "
                 f"{o.get('eval_accuracy', float('nan')):.3f} | "
                 f"{o.get('eval_bad_f1', float('nan')):.3f} | {r['sample_accuracy']:.3f} |")
  plot = _plot(summary, ns, os.path.join(out, "curve.png"))
  held, why = verdict(results)
  settings_json = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in s.items()})
  text = ["# PRM vs ORM vs majority vote (best-of-N)", "",
          "Mirrors Lightman et al. 2023 (\"Let's Verify Step by Step\"), figure 3, at CPU scale: "
          "column addition instead of MATH, a `tiny` model from scratch instead of GPT-4.", "",
          "**Claim.** " + CLAIM.format(n=max(ns)), "",
          f"**Command** ({len(results)} seeds, {seconds / 60:.1f} min): `{command}`", "",
          "**Setup.** " + " ".join((__doc__ or "").split("\n\n")[2].split()), "",
          f"Settings: {settings_json}",
          "", "## Held-out pass@1 of the pick", "", *lines, "",
          f"![best-of-N]({os.path.basename(plot)})" if plot else "", "",
          "## The reward models on held-out step labels", "", *evals, "",
          "## Verdict", "", why,
          "" if held else "The figure stands as measured; see the table for where it differs.",
          ""]
  path = os.path.join(out, "README.md")
  with open(path, "w") as f:
    f.write("\n".join(text))
  return path


def _plot(summary: dict, ns: list, path: str) -> Optional[str]:
  try:
    from ftjax import report
    plt = report._pyplot()
  except Exception:  # noqa: BLE001 (no matplotlib: the table alone)
    return None
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for i, m in enumerate(METHODS):
    mean = [summary[(n, m)]["mean"] for n in ns]
    err = [[mean[j] - summary[(n, m)]["lo"] for j, n in enumerate(ns)],
           [summary[(n, m)]["hi"] - mean[j] for j, n in enumerate(ns)]]
    ax.errorbar(ns, mean, yerr=err, fmt="o-", color=f"C{i}", label=m, capsize=3)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("N (solutions per problem)")
  ax.set_ylabel("held-out pass@1 of the pick")
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("best-of-N: mean over seeds (bars: 95% t interval)", fontsize=10)
  return report._save(fig, plt, path)


def run(workdir: str, out: Optional[str] = None, seeds: int = 3, steps: int = 0,
        smoke: bool = False) -> dict:
  """The study; returns {"readme", "results", "held"}."""
  s = settings(smoke, seeds, steps)
  out = out or os.path.join(REPO, "docs", "reproductions", "prm_vs_orm")
  t0 = time.time()
  results = [run_seed(workdir, s, seed) for seed in range(s["seeds"])]
  command = "python experiments/prm_vs_orm.py --workdir=/tmp/prm_vs_orm" + (
      f" --seeds={seeds}" if seeds != 3 else "") + (f" --steps={steps}" if steps else "") + (
      " --smoke" if smoke else "")
  readme = write_outputs(out, s, results, time.time() - t0, command)
  return {"readme": readme, "results": results, "held": verdict(results)[0]}
