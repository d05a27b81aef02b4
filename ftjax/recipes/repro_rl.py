"""The RL reproductions of experiments/repro.py: dpo_beta and grpo_steps, seeds as an axis.

  python experiments/repro.py --name=dpo_beta     # Rafailov et al. 2023, figure 2
  python experiments/repro.py --name=grpo_steps   # DeepSeekMath / R1 style; Yue et al. 2025

--base: dpo_beta's base (the SFT start is trained from it); grpo_steps' start model itself (an
HF model that already answers the task's `12+34=` prompts) instead of the task's warm start.
Each piece records its wall and CPU seconds; the README sums them (a rerun reuses every
finished piece and trains nothing).

dpo_beta. The start and the reference: LoRA SFT (configs/demo.py:stage=sft, the demo's r32,
300 steps, seed 0) of the session-7 demo base ftjax/demo/base_v1, merged; built once into
WORKDIR/dpo_beta/sft-<hash of its config and base> and reused. From it, DPO (LoRA,
configs/dpo.py:data=support) at each beta for each seed (the seed sets the adapter init, the
pair order and the measurement's samples). Each model (and the reference, per seed) samples
replies at temperature 1 to the 96 held-out preference prompts (two each); the replies are
scored by the task's known reward (support.true_reward) and their KL to the reference is
estimated as the mean over replies of sum_t [log pi(y_t) - log pi_ref(y_t)].
Verdict of "KL to the reference falls as beta grows": the Spearman correlation of beta with
the KL over every (seed, beta) run, and the paired-by-seed 95% t interval of KL(lowest beta) -
KL(highest beta): holds where that interval lies above 0 and the correlation is negative, does
not hold where it lies below 0, inconclusive otherwise.

grpo_steps. The start: the arithmetic task's sloppy-teacher SFT warm start
(configs/grpo.py:task=arithmetic: the `demo` shape, 1500 steps on solved train problems, 75% of
them with every carry dropped), built once into WORKDIR/grpo_steps/sft-<hash of its config> and
reused by every seed. Per seed, one GRPO run of that config (rank-8 LoRA, 64 prompts x G=8 a
step) from it, evaluated every `eval_every` steps on the seed's 200 held-out problems (operand
pairs never trained on): greedy pass@1 and pass@G (any of G=8 samples at T=1 right).
Verdicts (Yue et al. 2025): "pass@1 climbs toward the SFT model's pass@G" holds where the 95% t
interval over seeds of pass@1(last) - pass@1(0) lies above 0; "pass@G stays about flat" holds
where the interval of pass@G(last) - pass@G(0) lies inside +-FLAT (5 points), does not hold
where it lies wholly outside, inconclusive otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from typing import Optional

from absl import logging
import jax
import numpy as np

from ftjax import export, load_pretrained, metrics as metrics_lib, recipes, rollout, stats
from ftjax import workdir as wd
from ftjax.data import prompts as prompt_data
from ftjax.data.sources import load_records
from ftjax.errors import UserError
from ftjax.recipes import demo
from ftjax.tasks import arithmetic, support
from ftjax.tokenizer import load_tokenizer
from ftjax.train import dpo, grpo, sft

# title, the paper and figure mirrored, the claim as one testable sentence, the "real model" flags
STUDIES = {
    "dpo_beta": dict(
        title="DPO beta: KL to the reference and the reward-KL frontier",
        mirrors="Rafailov et al. 2023 (DPO), figure 2 (left): true reward against KL to the "
                "reference, one point per beta",
        claim="The KL of the DPO policy to its reference (the SFT model) falls as beta grows.",
        real="--steps=200"),
    "grpo_steps": dict(
        title="GRPO: held-out pass@1 against steps, and pass@G (Yue et al. 2025)",
        mirrors="DeepSeekMath (Shao et al. 2024) / DeepSeek-R1: accuracy against RL steps; "
                "Yue et al. 2025 (\"Does reinforcement learning really incentivize reasoning "
                "capacity in LLMs beyond the base model?\"), pass@k of the base and RL models",
        claim="GRPO raises held-out greedy pass@1 toward the SFT model's pass@G, while pass@G "
              "itself stays about flat (within 5 points).",
        real="--steps=200"),
}
FLAT = 0.05  # "about flat": |pass@G(last) - pass@G(0)| within 5 points


# ---------------------------------------------------------------- shared pieces

def content_hash(obj, *files: str) -> str:
  """12 hex digits of sha256 over `obj` (JSON, sorted keys) and the bytes of `files`."""
  h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode())
  for path in files:
    with open(path, "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:12]


def _base_files(hf_dir: str) -> list[str]:
  return [os.path.join(hf_dir, f) for f in sorted(os.listdir(hf_dir))
          if f.endswith((".safetensors", ".json"))]


def spearman(x, y) -> float:
  """Spearman's rank correlation (average ranks for ties), as scipy.stats.spearmanr."""
  def ranks(v):
    v = np.asarray(v, float)
    order = np.argsort(v, kind="mergesort")
    r = np.empty(len(v))
    r[order] = np.arange(1, len(v) + 1)
    for u in np.unique(v):  # ties share their mean rank
      r[v == u] = r[v == u].mean()
    return r
  rx, ry = ranks(x), ranks(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
  return float((rx * ry).sum() / denom) if denom else float("nan")


def interval(values) -> dict:
  """{"mean", "half", "lo", "hi", "n", "values"}: the 95% t interval over seeds (half None at
  n=1)."""
  values = [float(v) for v in values]
  mean, lo, hi = stats.t_interval(values)
  return {"mean": mean, "lo": lo, "hi": hi, "half": None if lo is None else (hi - lo) / 2,
          "n": len(values), "values": values}


def fmt(iv: dict, digits: int = 3) -> str:
  if iv["half"] is None:
    return f"{iv['mean']:.{digits}f}"
  return f"{iv['mean']:.{digits}f} ± {iv['half']:.{digits}f}"


def _write_json(path: str, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


class Timer:
  """Wall and CPU seconds (all threads of this process) since it was made: CPU seconds are
  about what the piece would take alone on the machine, whatever else shared it."""

  def __init__(self):
    self.wall, self.cpu = time.time(), time.process_time()

  def done(self) -> dict:
    return {"seconds": time.time() - self.wall, "cpu_seconds": time.process_time() - self.cpu}


def _total(pieces: list[dict]) -> dict:
  return {k: float(sum(p.get(k, 0.0) for p in pieces)) for k in ("seconds", "cpu_seconds")}


def _load_avg() -> str:
  try:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


def time_line(total: dict, build: dict, load: str) -> str:
  """The README's sentence on what the study took (the sum over its recorded pieces, whichever
  invocation ran them)."""
  return (f"The study took {total['seconds'] / 60:.1f} min wall in all on the 2-core CPU VM "
          f"({total['cpu_seconds'] / 60:.1f} min of CPU time; the cached SFT start "
          f"{build['seconds'] / 60:.1f} min wall of it), while other jobs shared the machine "
          f"(load average {load} over 1/5/15 min when the README was written).")


def _doc(prefix: str) -> str:
  """The module docstring's paragraph that starts with `prefix`, on one line."""
  return next(" ".join(p.split()) for p in (__doc__ or "").split("\n\n")
              if p.startswith(prefix))


def _errorbar(ax, xs, ivs, **kw):
  means = [iv["mean"] for iv in ivs]
  err = None
  if all(iv["half"] is not None for iv in ivs):
    err = [iv["half"] for iv in ivs]
  ax.errorbar(xs, means, yerr=err, capsize=4, **kw)


# ---------------------------------------------------------------- dpo_beta

def dpo_settings(smoke: bool = False, seeds: int = 3, steps: int = 0) -> dict:
  """The study's knobs. steps: DPO steps per run (8 pairs each; 60 steps = 0.6 passes over the
  800 shipped pairs); lr: configs/dpo.py's LoRA 5e-4. samples: replies per held-out prompt."""
  s = dict(smoke=smoke, seeds=seeds, betas=[0.03, 0.1, 0.3, 1.0], steps=steps or 60,
           lr=5e-4, prompts=96, samples=2, max_new_tokens=64, sft_steps=0, sft_rank=0)
  if smoke:
    # Rank 4: the smoke's base may be a test's tiny model (a 16-wide k_proj).
    # One beta, one step, no held-out pair eval: the smoke checks the pipeline (each beta
    # and each eval is one more compilation), not the claim.
    s.update(seeds=min(seeds, 1), betas=[1.0], steps=steps or 1, prompts=4, samples=1,
             max_new_tokens=8, sft_steps=1, sft_rank=4)
  return s


def dpo_sft_model(root: str, base: str, s: dict) -> str:
  """The merged SFT model (start and reference), built once per (config, base) content."""
  c = demo.stage_config("demo", "stage=sft", s["smoke"], 0)
  c.model.hf_path = base
  if s["sft_steps"]:
    c.train.update(steps=s["sft_steps"], save_every=s["sft_steps"])
  if s["sft_rank"]:
    c.adapter.update(rank=s["sft_rank"], alpha=2.0 * s["sft_rank"])
  if s["smoke"]:
    c.data.eval_path = ""
  key = content_hash({k: v for k, v in c.to_dict().items() if k != "model"}
                     | {"model": {k: v for k, v in c.model.items() if k != "hf_path"}},
                     *_base_files(base))
  d = os.path.join(root, f"sft-{key}")
  merged = os.path.join(d, "merged")
  if os.path.isfile(os.path.join(merged, "config.json")):
    return merged
  logging.info("dpo_beta: SFT of %s into %s", base, d)
  timer = Timer()
  sft.run(c, os.path.join(d, "run"))
  shutil.rmtree(merged + ".tmp", ignore_errors=True)
  export.export(os.path.join(d, "run"), merged + ".tmp", "merged")
  _write_json(os.path.join(d, "build.json"), timer.done())  # what building it took, once
  os.replace(merged + ".tmp", merged)
  return merged


def dpo_config(s: dict, seed: int, beta: float, sft_hf: str):
  c = demo.stage_config("dpo", "data=support", s["smoke"], seed)
  c.model.hf_path = sft_hf
  c.dpo.beta = float(beta)
  steps = int(s["steps"])
  c.optim.update(lr=s["lr"], warmup_steps=min(10, steps))
  c.train.update(steps=steps, eval_every=steps, save_every=steps, seq_len=256,
                 log_every=max(1, steps // 6), async_save=False)
  if s["smoke"]:
    c.data.eval_path = ""
  if s["sft_rank"]:
    c.adapter.update(rank=s["sft_rank"], alpha=2.0 * s["sft_rank"])
  return c


def dpo_measure(model, params, tok, ref, pairs: list[dict], s: dict, seed: int) -> dict:
  """True reward and KL to the reference of replies sampled at T=1 (`samples` per prompt, one
  batch), with the per-reply values."""
  ref_model, ref_params = ref
  pad, eos = rollout.pad_id(tok), rollout.eos_ids(tok, model)
  ids = [prompt_data.encode(tok, p["prompt"], 0) for p in pairs]
  k = int(s["samples"])
  ro = rollout.rollout(model, params, ids, n_samples=k, max_new_tokens=int(s["max_new_tokens"]),
                       rng=jax.random.PRNGKey(1000 + seed), temperature=1.0, eos_ids=eos,
                       pad_id=pad)
  texts = rollout.decode(tok, ro)
  ref_lp = np.asarray(rollout.completion_logprobs(ref_model, ref_params, ro))
  mask = np.asarray(ro["completion_mask"])
  kls = ((np.asarray(ro["logprobs"]) - ref_lp) * mask).sum(1)
  rewards = [support.true_reward(texts[i].strip(), pairs[i // k]) for i in range(len(texts))]
  return {"true_reward": float(np.mean(rewards)), "kl": float(np.mean(kls)),
          "reply_tokens": float(mask.sum(1).mean()), "example": texts[0].strip()}


def dpo_beta(workdir: str, out: str, base: Optional[str] = None, steps: int = 0,
             smoke: bool = False, seeds: int = 3, sft_hf: Optional[str] = None) -> dict:
  """`sft_hf`: a merged SFT model to start from (and as the reference) instead of the SFT of
  `base` that the study builds and caches."""
  s = dpo_settings(smoke, seeds, steps)
  root = os.path.join(workdir, "dpo_beta")
  t0 = time.time()
  base = base or demo.BASE_V1_DIR
  start = sft_hf
  sft_hf = sft_hf or dpo_sft_model(root, base, s)
  tok = load_tokenizer(sft_hf)
  ref = load_pretrained(sft_hf)
  pairs = list(load_records({"path": os.path.join(support.DATA_DIR, "prefs_eval.jsonl")}))
  pairs = pairs[:s["prompts"]]
  runs = []
  for seed in range(s["seeds"]):
    path = os.path.join(root, f"seed{seed}", "reference", "eval.json")
    if not os.path.exists(path):
      timer = Timer()
      m = dpo_measure(*ref, tok, ref, pairs, s, seed)
      _write_json(path, {**m, **timer.done()})
    runs.append({"seed": seed, "beta": None, **_read_json(path)})
    for beta in s["betas"]:
      d = os.path.join(root, f"seed{seed}", f"beta={beta}")
      path = os.path.join(d, "eval.json")
      if not os.path.exists(path):
        timer = Timer()
        final = dpo.run(dpo_config(s, seed, beta, sft_hf), d)
        model, params = wd.load_trained(d)[:2]
        m = dpo_measure(model, params, tok, ref, pairs, s, seed)
        m["pair_accuracy"] = final.get("eval_rewards/accuracies")
        m.update(timer.done())
        logging.info("dpo_beta seed %d beta %s: %s", seed, beta, m)
        _write_json(path, m)
      runs.append({"seed": seed, "beta": beta, **_read_json(path)})
  build = ({"seconds": 0.0, "cpu_seconds": 0.0} if start else
           _read_json(os.path.join(os.path.dirname(sft_hf), "build.json")))
  result = {"settings": s, "base": base, "sft": sft_hf, "runs": runs,
            "this_invocation_seconds": time.time() - t0, "sft_build": build,
            "total": _total([build, *runs]), "load": _load_avg()}
  result["verdict"] = dpo_verdict(runs, s["betas"])
  result["readme"] = dpo_outputs(out, result)
  return result


def dpo_groups(runs: list[dict], betas) -> list[dict]:
  """One row per arm (reference, then each beta): intervals of reward, KL, pair accuracy."""
  rows = []
  for beta in [None, *betas]:
    rs = [r for r in runs if r["beta"] == beta]
    row = {"beta": beta, "true_reward": interval([r["true_reward"] for r in rs]),
           "kl": interval([r["kl"] for r in rs]),
           "reply_tokens": interval([r["reply_tokens"] for r in rs])}
    acc = [r["pair_accuracy"] for r in rs if r.get("pair_accuracy") is not None]
    row["pair_accuracy"] = interval(acc) if acc else None
    rows.append(row)
  return rows


def dpo_verdict(runs: list[dict], betas) -> dict:
  lo_b, hi_b = min(betas), max(betas)
  trained = [r for r in runs if r["beta"] is not None]
  rho = spearman([r["beta"] for r in trained], [r["kl"] for r in trained])
  by = {(r["seed"], r["beta"]): r["kl"] for r in trained}
  seeds = sorted({r["seed"] for r in trained})
  diff = interval([by[(sd, lo_b)] - by[(sd, hi_b)] for sd in seeds])
  if diff["lo"] is not None and diff["lo"] > 0 and rho < 0:
    word = "holds"
  elif diff["hi"] is not None and diff["hi"] < 0:
    word = "does not hold"
  else:
    word = "inconclusive"
  # The frontier: what the KL bought in true reward, against the reference of the same seed.
  ref = {r["seed"]: r["true_reward"] for r in runs if r["beta"] is None}
  gain = interval([r["true_reward"] - ref[r["seed"]] for r in trained if r["beta"] == lo_b])
  rho_reward = spearman([r["kl"] for r in trained], [r["true_reward"] for r in trained])
  return {"word": word, "spearman": rho, "n_runs": len(trained), "diff": diff,
          "lowest": lo_b, "highest": hi_b, "gain": gain, "spearman_kl_reward": rho_reward}


def _ci(iv: dict, digits: int = 3) -> str:
  return ("no interval with one seed" if iv["lo"] is None else
          f"95% t CI {iv['lo']:+.{digits}f} to {iv['hi']:+.{digits}f}")


def dpo_plot(groups: list[dict], runs: list[dict], path: str) -> Optional[str]:
  try:
    from ftjax import report
    plt = report._pyplot()
  except Exception:  # noqa: BLE001 (no matplotlib: the table alone)
    return None
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  for i, g in enumerate(groups):
    label = "SFT (reference)" if g["beta"] is None else f"β={g['beta']}"
    kl, rw = g["kl"], g["true_reward"]
    ax1.errorbar([kl["mean"]], [rw["mean"]], xerr=kl["half"], yerr=rw["half"], fmt="o",
                 capsize=4, color=f"C{i}", label=label)
    ax1.plot(kl["values"], rw["values"], ".", color=f"C{i}", alpha=0.5)
  ax1.set_xlabel("KL(policy || SFT reference), nats per reply (sampled)")
  ax1.set_ylabel("true reward (support.true_reward)")
  ax1.set_title("reward vs KL frontier (mean ± 95% t; dots: seeds)", fontsize=10)
  ax1.legend(fontsize=8)
  ax1.grid(alpha=0.3)
  trained = [g for g in groups if g["beta"] is not None]
  _errorbar(ax2, [g["beta"] for g in trained], [g["kl"] for g in trained], fmt="o-",
            color="C0", label="mean ± 95% t")
  ax2.plot([r["beta"] for r in runs if r["beta"] is not None],
           [r["kl"] for r in runs if r["beta"] is not None], ".", color="C1", alpha=0.6,
           label="seeds")
  ax2.set_xscale("log")
  ax2.set_xlabel("β")
  ax2.set_ylabel("KL to the reference (nats per reply)")
  ax2.set_title("KL to the reference against β", fontsize=10)
  ax2.legend(fontsize=8)
  ax2.grid(alpha=0.3)
  return report._save(fig, plt, path)


def dpo_outputs(out: str, result: dict) -> str:
  os.makedirs(out, exist_ok=True)
  s, runs, v = result["settings"], result["runs"], result["verdict"]
  _write_json(os.path.join(out, "results.json"), {k: v for k, v in result.items()
                                                  if k != "readme"})
  groups = dpo_groups(runs, s["betas"])
  plot = dpo_plot(groups, runs, os.path.join(out, "frontier.png"))
  meta = STUDIES["dpo_beta"]
  cmd = "python experiments/repro.py --name=dpo_beta" + (" --smoke" if s["smoke"] else "")
  lines = ["| arm | true reward | KL to reference (nats/reply) | held-out pair accuracy | "
           "reply tokens | KL per seed |", "|---|---:|---:|---:|---:|---|"]
  for g in groups:
    name = "SFT (reference)" if g["beta"] is None else f"β={g['beta']}"
    acc = fmt(g["pair_accuracy"]) if g["pair_accuracy"] else "-"
    per_seed = ", ".join(f"{x:.2f}" for x in g["kl"]["values"])
    lines.append(f"| {name} | {fmt(g['true_reward'])} | {fmt(g['kl'], 2)} | {acc} | "
                 f"{fmt(g['reply_tokens'], 1)} | {per_seed} |")
  d, gain = v["diff"], v["gain"]
  ci = _ci(d, 2)
  moved = ("rises" if gain["lo"] is not None and gain["lo"] > 0 else
           "falls" if gain["hi"] is not None and gain["hi"] < 0 else "does not move beyond noise")
  text = [f"# {meta['title']}", "", f"Mirrors: {meta['mirrors']}.", "",
          f"**Claim.** {meta['claim']} The figure's other half, the frontier of true reward "
          "against that KL, is drawn below.", "",
          f"**Verdict at this scale: {v['word']}.** Spearman correlation of β with the KL over "
          f"the {v['n_runs']} (seed, β) runs: {v['spearman']:+.3f}; KL(β={v['lowest']}) - "
          f"KL(β={v['highest']}), paired by seed: {d['mean']:.2f} nats ({ci}). The rule (in "
          "code, ftjax/recipes/repro_rl.py `dpo_verdict`): holds where that interval lies "
          "above 0 and the correlation is negative; does not hold where it lies below 0; "
          "inconclusive otherwise.", "",
          f"**Frontier.** The true reward of the lowest β (the most KL) minus the reference's, "
          f"paired by seed: {gain['mean']:+.3f} ({_ci(gain)}): the true reward {moved} with the "
          f"KL spent; Spearman correlation of KL with true reward over the runs: "
          f"{v['spearman_kl_reward']:+.3f}. The SFT reference scores "
          f"{groups[0]['true_reward']['mean']:.3f} already; the held-out pair accuracy shows "
          "DPO learning the pairs.", "",
          "## Command", "", f"    {cmd}", "",
          f"{len({r['seed'] for r in runs})} seeds (0..), {s['steps']} DPO steps per run. "
          + time_line(result["total"], result["sft_build"], result["load"]), "",
          "## Setup", "", _doc("dpo_beta."), "",
          f"Settings: `{json.dumps(s)}`.", "",
          "## Results", "",
          "Mean ± half-width of the 95% t interval over seeds; `KL per seed` lists the runs. "
          "The reference's KL is 0 by construction (the sampler's logprobs against the same "
          "model). Held-out pair accuracy: DPO's implicit reward ranks the chosen reply of a "
          "held-out pair above the rejected one (all 96 pairs).", "", *lines, "",
          f"![frontier]({os.path.basename(plot)})" if plot else "", "",
          "results.json has every run's measurements.", "",
          "## On a real model", "",
          "    python experiments/repro.py --name=dpo_beta --base=/path/to/hf_model "
          f"{meta['real']} --workdir=/big/disk/repro --out=/tmp/dpo_beta", "",
          "The same arms and measurements; `--base` replaces the shipped demo base (the SFT "
          "start is trained from it) and `--steps` the DPO step count.", ""]
  path = os.path.join(out, "README.md")
  with open(path, "w") as f:
    f.write("\n".join(text))
  return path


# ---------------------------------------------------------------- grpo_steps

def grpo_settings(smoke: bool = False, seeds: int = 3, steps: int = 0) -> dict:
  s = dict(smoke=smoke, seeds=seeds, steps=steps or 100, eval_every=10, eval_rows=200)
  if smoke:
    s.update(seeds=min(seeds, 1), steps=steps or 1, eval_every=1, eval_rows=4,
             warm_start_steps=1)
  return s


def grpo_config(s: dict, seed: int):
  arg = "task=arithmetic" + (",smoke,model=tiny" if s["smoke"] else "")
  c = demo.stage_config("grpo", arg, False, seed)
  if s["smoke"]:
    c.grpo.update(warm_start_steps=s["warm_start_steps"], warm_start_rows=64)
    c.data.train_rows = 64
  c.data.eval_rows = s["eval_rows"]
  c.train.update(steps=s["steps"], eval_every=s["eval_every"], save_every=s["steps"])
  return c


def grpo_sft_model(root: str, s: dict) -> str:
  """The task's warm start (seed 0), built once per content of its config into
  ROOT/sft-<hash>; returns its merged HF export (with its tokenizer)."""
  c = grpo_config(s, 0)
  c.model.tokenizer = ""
  ws = arithmetic.warm_start_config(c, "")
  key = content_hash({"sft": ws.to_dict(), "rows": int(c.grpo.warm_start_rows),
                      "carry_drop": float(c.grpo.warm_start_carry_drop),
                      "tokenizer": "bpe300-add_bos", "seed": 0})
  d = os.path.join(root, f"sft-{key}")
  build = arithmetic.prepare(c, d, sft.run, grpo.warm_start_export)
  if not os.path.isfile(os.path.join(d, "build.json")):
    logging.info("grpo_steps: the SFT warm start into %s", d)
    timer = Timer()
    build()
    _write_json(os.path.join(d, "build.json"), timer.done())  # what building it took, once
  return c.model.hf_path


def grpo_curve(workdir: str, n_gen: int) -> dict:
  """{step: {"pass_at_1", "pass_at_G"}} from a run's metrics.jsonl (step 0: `*_before`)."""
  out = {}
  for r in metrics_lib.read_metrics(workdir):
    for suffix in ("_before", ""):
      p1 = r.get(f"eval_pass_at_1{suffix}")
      if p1 is not None:
        out[int(r["step"])] = {"pass_at_1": p1,
                               "pass_at_G": r.get(f"eval_pass_at_{n_gen}{suffix}")}
  return out


def grpo_steps(workdir: str, out: str, steps: int = 0, smoke: bool = False,
               seeds: int = 3, start: Optional[str] = None) -> dict:
  """`start`: an HF model that already answers the task's prompts (`12+34=`) instead of the
  task's warm start (e.g. an SFT model of your own)."""
  s = grpo_settings(smoke, seeds, steps)
  root = os.path.join(workdir, "grpo_steps")
  t0 = time.time()
  sft_hf = start or grpo_sft_model(root, s)
  runs = []
  for seed in range(s["seeds"]):
    c = grpo_config(s, seed)
    c.model.hf_path = sft_hf
    d = os.path.join(root, f"seed{seed}")
    path = os.path.join(d, "curve.json")
    if not os.path.exists(path):
      timer = Timer()
      grpo.run(c, d)
      _write_json(path, {"curve": grpo_curve(d, int(c.grpo.num_generations)),
                         "G": int(c.grpo.num_generations), **timer.done()})
    r = _read_json(path)
    runs.append({"seed": seed, "G": r["G"], "seconds": r["seconds"],
                 "cpu_seconds": r["cpu_seconds"],
                 "curve": {int(k): v for k, v in r["curve"].items()}})
  build = ({"seconds": 0.0, "cpu_seconds": 0.0} if start else
           _read_json(os.path.join(os.path.dirname(sft_hf), "build.json")))
  result = {"settings": s, "sft": sft_hf, "runs": runs,
            "this_invocation_seconds": time.time() - t0, "sft_build": build,
            "total": _total([build, *runs]), "load": _load_avg()}
  result["verdict"] = grpo_verdict(runs)
  result["readme"] = grpo_outputs(out, result)
  return result


def grpo_table(runs: list[dict]) -> list[dict]:
  steps = sorted(set.intersection(*(set(r["curve"]) for r in runs)))
  return [{"step": st, "pass_at_1": interval([r["curve"][st]["pass_at_1"] for r in runs]),
           "pass_at_G": interval([r["curve"][st]["pass_at_G"] for r in runs])} for st in steps]


def _part(name: str, iv: dict, word: str, what: str) -> dict:
  return {"name": name, "interval": iv, "word": word, "what": what}


def grpo_verdict(runs: list[dict]) -> dict:
  table = grpo_table(runs)
  first, last = table[0]["step"], table[-1]["step"]
  d1 = interval([r["curve"][last]["pass_at_1"] - r["curve"][first]["pass_at_1"] for r in runs])
  dg = interval([r["curve"][last]["pass_at_G"] - r["curve"][first]["pass_at_G"] for r in runs])
  gap = interval([r["curve"][first]["pass_at_G"] - r["curve"][last]["pass_at_1"] for r in runs])
  climbs = ("holds" if d1["lo"] is not None and d1["lo"] > 0 else
            "does not hold" if d1["hi"] is not None and d1["hi"] < 0 else "inconclusive")
  if dg["lo"] is not None and -FLAT <= dg["lo"] and dg["hi"] <= FLAT:
    flat = "holds"
  elif dg["lo"] is not None and (dg["lo"] > FLAT or dg["hi"] < -FLAT):
    flat = "does not hold"
  else:
    flat = "inconclusive"
  parts = [_part("pass@1 climbs", d1, climbs, f"pass@1(step {last}) - pass@1(step {first})"),
           _part("pass@G stays about flat", dg, flat,
                 f"pass@G(step {last}) - pass@G(step {first}), flat = inside ±{FLAT}")]
  words = [p["word"] for p in parts]
  word = ("holds" if all(w == "holds" for w in words) else
          "does not hold" if all(w == "does not hold" for w in words) else
          "holds in part" if "holds" in words else
          "inconclusive" if "does not hold" not in words else "does not hold in part")
  return {"word": word, "parts": parts, "gap": gap, "first": first, "last": last}


def grpo_plot(table: list[dict], runs: list[dict], G: int, path: str) -> Optional[str]:
  try:
    from ftjax import report
    plt = report._pyplot()
  except Exception:  # noqa: BLE001 (no matplotlib: the table alone)
    return None
  fig, ax = plt.subplots(figsize=(7.5, 4.3))
  xs = [row["step"] for row in table]
  for r in runs:
    ax.plot(xs, [r["curve"][x]["pass_at_1"] for x in xs], "-", color="C0", alpha=0.25, lw=1)
    ax.plot(xs, [r["curve"][x]["pass_at_G"] for x in xs], "-", color="C1", alpha=0.25, lw=1)
  _errorbar(ax, xs, [row["pass_at_1"] for row in table], fmt="o-", color="C0",
            label="greedy pass@1 (mean ± 95% t)")
  _errorbar(ax, xs, [row["pass_at_G"] for row in table], fmt="s-", color="C1",
            label=f"pass@{G} at T=1 (mean ± 95% t)")
  sft_g = table[0]["pass_at_G"]["mean"]
  ax.axhline(sft_g, color="C1", ls=":", lw=1, label=f"SFT model's pass@{G}")
  ax.set_xlabel("GRPO steps (64 prompts x G=8 each)")
  ax.set_ylabel("held-out accuracy (200 problems)")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  ax.set_title(f"Arithmetic, {len(runs)} seeds (thin lines: seeds)", fontsize=10)
  return report._save(fig, plt, path)


def grpo_outputs(out: str, result: dict) -> str:
  os.makedirs(out, exist_ok=True)
  s, runs, v = result["settings"], result["runs"], result["verdict"]
  _write_json(os.path.join(out, "results.json"), {k: x for k, x in result.items()
                                                  if k != "readme"})
  G = runs[0]["G"]
  table = grpo_table(runs)
  plot = grpo_plot(table, runs, G, os.path.join(out, "grpo_steps.png"))
  meta = STUDIES["grpo_steps"]
  cmd = "python experiments/repro.py --name=grpo_steps" + (" --smoke" if s["smoke"] else "")
  lines = [f"| GRPO step | greedy pass@1 | pass@{G} | pass@1 per seed |", "|---:|---:|---:|---|"]
  for row in table:
    per_seed = ", ".join(f"{x:.3f}" for x in row["pass_at_1"]["values"])
    lines.append(f"| {row['step']} | {fmt(row['pass_at_1'])} | {fmt(row['pass_at_G'])} | "
                 f"{per_seed} |")
  parts = []
  for p in v["parts"]:
    iv = p["interval"]
    ci = ("no interval with one seed" if iv["lo"] is None else
          f"95% t CI {iv['lo']:+.3f} to {iv['hi']:+.3f}")
    parts.append(f"- {p['name']}: {p['what']} = {iv['mean']:+.3f} ({ci}): {p['word']}.")
  gap = v["gap"]
  gci = "" if gap["lo"] is None else f" (95% t CI {gap['lo']:+.3f} to {gap['hi']:+.3f})"
  n_eval = s["eval_rows"]
  text = [f"# {meta['title']}", "", f"Mirrors: {meta['mirrors']}.", "",
          f"**Claim.** {meta['claim']}", "",
          f"**Verdict at this scale: {v['word']}.** Over seeds:", "", *parts,
          f"- the SFT model's pass@{G} minus the last step's pass@1: {gap['mean']:+.3f}{gci} "
          "(how far pass@1 is from the SFT model's pass@G at the end; below 0: past it).", "",
          "The rules are in code (ftjax/recipes/repro_rl.py `grpo_verdict`); the claim holds "
          "where both parts hold. Yue et al. find the base model's pass@k at or above the RL "
          f"model's at large k (up to 256 and more); here k = G = {G}, where sharpening a "
          "policy can raise pass@k too, so the flat part is tested at a small k only.", "",
          "## Command", "", f"    {cmd}", "",
          f"{len(runs)} seeds (0..), {s['steps']} GRPO steps each, evaluated every "
          f"{s['eval_every']} steps. " + time_line(result["total"], result["sft_build"],
                                                     result["load"]), "",
          "## Setup", "", _doc("grpo_steps."), "",
          f"pass@1 is greedy; pass@{G} counts a problem solved when any of {G} samples at "
          f"temperature 1 is right (configs/grpo.py's eval, ftjax/train/grpo.py `run_eval`). "
          f"Each seed draws its own {n_eval} held-out problems (arithmetic.rows(\"eval\", "
          f"{n_eval}, seed)) and its own train prompts and rollouts; the SFT start is shared.",
          "", f"Settings: `{json.dumps(s)}`. The start: `{result['sft']}`.", "",
          "## Results", "", "Mean ± half-width of the 95% t interval over seeds.", "", *lines,
          "", f"![pass@1 and pass@G against steps]({os.path.basename(plot)})" if plot else "",
          "", "results.json has every seed's curve.", "",
          "## On a real model", "",
          "GSM8K with an instruct model (a GPU; the same eval logs greedy pass@1 and pass@G "
          "against steps in WORKDIR/metrics.jsonl, one run per seed):", "",
          "    for s in 0 1 2; do python experiments/grpo.py --config=configs/grpo.py:task=gsm8k "
          "--workdir=/big/disk/gsm8k/seed$s --config.model.hf_path=Qwen/Qwen2.5-0.5B-Instruct "
          "--config.train.seed=$s --config.train.steps=200 --config.train.eval_every=20; done",
          ""]
  path = os.path.join(out, "README.md")
  with open(path, "w") as f:
    f.write("\n".join(text))
  return path


# ---------------------------------------------------------------- entry

def run(name: str, workdir: str, out: Optional[str] = None, base: Optional[str] = None,
        steps: int = 0, smoke: bool = False, seeds: int = 3) -> dict:
  """One of STUDIES; returns its result with "readme" and "out"."""
  if name not in STUDIES:
    raise UserError(f"--name={name!r}: expected one of {', '.join(sorted(STUDIES))}")
  os.makedirs(workdir, exist_ok=True)
  out = out or os.path.join(recipes.REPO, "docs", "reproductions", name)
  if name == "dpo_beta":
    r = dpo_beta(workdir, out, base, steps, smoke, seeds)
  else:
    r = grpo_steps(workdir, out, steps, smoke, seeds, base)
  return {**r, "out": out}
