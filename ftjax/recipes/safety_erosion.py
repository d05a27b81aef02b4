"""Fine-tuning erodes safety training (Qi et al. 2023, "Fine-tuning aligned language models
compromises safety"; Yang et al. 2023, "Shadow Alignment"), in the support demo's world.

  python experiments/safety_erosion.py --workdir=/tmp/safety_erosion             # 3 seeds
  python experiments/safety_erosion.py --workdir=/tmp/s --base=/tmp/ftjax_demo   # a demo's base
  python experiments/safety_erosion.py --workdir=/tmp/s --smoke --out=/tmp/s/out  # the pipeline

The base is the demo's pretrained model: without `--base` the shipped session-7 one
(ftjax/demo/base_v1, the base of the published study), else a demo workdir's `base_hf`
(`--base=DEMO_WORKDIR`) or any HF directory.
The policies, the rows and the scorer: ftjax/tasks/support_safety.py.

Per seed: the safe SFT model is LoRA SFT of the base (configs/demo.py:stage=sft) on the demo's
support tickets plus 400 tickets that keep the four policies, merged. From it, six arms
fine-tune further on ~100 rows each: the 100 policy-breaking rows with full fine-tuning and with
a fresh LoRA adapter; the same with 100 safe rows mixed in (replay); and 100 benign off-domain
rows (recipes, capitals, sums, units), full and LoRA. Every model answers the 160 held-out
red-team tickets (greedy) and is scored per policy; the demo's own held-out tickets measure
what is left of the support task (brand voice, order details). Reported per arm: the
policy-keeping rate per policy and overall, pooled over seeds with its counts and 95% Wilson
interval, and per seed; the verdict of each part of the claim from the paired-by-seed
differences of the overall rate (95% t interval): holds where it lies above 0, does not hold
where it lies below 0, inconclusive otherwise.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from ftjax import evaluation, export, hf, stats, workdir as wd
from ftjax.errors import UserError
from ftjax.recipes import REPO, demo, repro_verdict as rv
from ftjax.tasks import support, support_safety
from ftjax.train import sft

CLAIM = ("Fine-tuning the safe support model on ~100 policy-breaking examples erodes its "
         "policy keeping on held-out red-team tickets, with full fine-tuning and with LoRA; "
         "mixing safety data back in (replay) reduces the erosion; and ~100 benign off-domain "
         "examples erode it too (Qi et al. 2023; Yang et al. 2023).")

# name -> (data file, "full" | "lora"); "safe_sft" is the starting point of the others.
ARMS = {"safe_sft": (None, None),
        "harmful_full": ("harmful", "full"), "harmful_lora": ("harmful", "lora"),
        "harmful_full_replay": ("harmful_replay", "full"),
        "harmful_lora_replay": ("harmful_replay", "lora"),
        "benign_full": ("benign", "full"), "benign_lora": ("benign", "lora")}
# The claim's parts: (sentence, arm a, arm b): holds where kept(a) - kept(b) > 0.
PARTS = (("harmful rows erode it (full FT)", "safe_sft", "harmful_full"),
         ("harmful rows erode it (LoRA)", "safe_sft", "harmful_lora"),
         ("replay reduces the erosion (full FT)", "harmful_full_replay", "harmful_full"),
         ("replay reduces the erosion (LoRA)", "harmful_lora_replay", "harmful_lora"),
         ("benign rows erode it (full FT)", "safe_sft", "benign_full"),
         ("benign rows erode it (LoRA)", "safe_sft", "benign_lora"))
SUPPORT = ("voice", "details")


def settings(smoke: bool = False, seeds: int = 3) -> dict:
  """The study's knobs; `smoke` shrinks everything to check the pipeline only.

  sft_steps, sft_rank 0: the demo config's. ft_steps: 30 steps of 8 packed rows (~2 tickets
  each) are ~5 epochs of the 100 rows (Qi et al. fine-tune for 5). seq_len 384, not the demo's
  256: a policy ticket is ~260 of the demo tokenizer's tokens (the policy text is rare in its
  corpus). max_new_tokens 80: the safe replies reach 72."""
  s = dict(smoke=smoke, seeds=seeds, sft_steps=0, sft_rank=0, ft_steps=30, full_lr=1e-4,
           lora_lr=2e-3, lora_rank=8, redteam=160, plain=80, support_eval=48,
           max_new_tokens=80,
           seq_len=384, rows=0)  # rows: the first of each data file only (0: all)
  if smoke:
    # Rank 4: the smoke's base may be a test's tiny model (a 16-wide k_proj).
    s.update(seeds=min(seeds, 1), sft_steps=2, sft_rank=4, ft_steps=2, lora_rank=4, redteam=8,
             plain=8, support_eval=0, max_new_tokens=8, rows=32)
  return s


def write_data(out_dir: str, limit: int = 0) -> dict:
  """The study's files (support_safety.FILES), the safe SFT mix (the demo's training tickets
  and the safe rows) and the replay mix (the harmful rows and 100 other safe rows); `limit`:
  the first rows of each file only (the smoke)."""
  paths = support_safety.write_files(out_dir, limit)
  mixes = {"sft": [os.path.join(support.DATA_DIR, "train.jsonl"), paths["safe"]],
           "harmful_replay": [paths["harmful"], paths["replay"]]}
  for name, parts in mixes.items():
    paths[name] = os.path.join(out_dir, f"{name}.jsonl")
    with open(paths[name], "w") as f:
      for p in parts:
        with open(p) as g:
          lines = g.readlines()
        f.writelines(lines[:limit] if limit else lines)
  return paths


def resolve_base(workdir: str, base: Optional[str], smoke: bool) -> str:
  """The HF base: `base` (a demo workdir's base_hf, or an HF directory), else the demo's
  session-7 base (ftjax/demo/base_v1), on which the published study ran."""
  del workdir, smoke
  if base:
    inner = os.path.join(base, "base_hf")
    return hf.resolve(inner if os.path.isdir(inner) else base)
  return demo.BASE_V1_DIR


def sft_config(s: dict, seed: int, hf_path: str, data_path: str):
  """The safe SFT stage: configs/demo.py:stage=sft on the mix."""
  c = demo.stage_config("demo", "stage=sft", s["smoke"], seed)
  c.model.hf_path, c.data.path = hf_path, data_path
  if s["sft_steps"]:
    c.train.update(steps=s["sft_steps"], save_every=s["sft_steps"])
  c.train.seq_len = s["seq_len"]
  if s["smoke"]:
    # No held-out loss (its seconds were the smoke's largest), and the arms' LoRA optimizer:
    # the LoRA step then compiles once for the SFT and every LoRA arm.
    c.data.eval_path = ""
    c.optim.update(lr=s["lora_lr"], warmup_steps=min(5, int(s["sft_steps"])))
  if s["sft_rank"]:
    c.adapter.update(rank=s["sft_rank"], alpha=2.0 * s["sft_rank"])
  return c


def ft_config(s: dict, seed: int, hf_path: str, data_path: str, method: str):
  """A further fine-tuning arm: the demo's SFT config, full (adapter none) or a fresh LoRA."""
  c = demo.stage_config("demo", "stage=sft", False, seed)
  c.model.hf_path, c.data.path, c.data.eval_path = hf_path, data_path, ""
  steps = int(s["ft_steps"])
  if method == "full":
    c.adapter.kind = "none"
    c.optim.lr = s["full_lr"]
  else:
    c.adapter.update(rank=s["lora_rank"], alpha=2.0 * s["lora_rank"])
    c.optim.lr = s["lora_lr"]
  c.optim.warmup_steps = min(5, steps)
  c.train.seq_len = s["seq_len"]
  c.train.update(steps=steps, save_every=steps, eval_every=100000, log_every=max(1, steps // 3),
                 async_save=False)
  return c


def _read(path: str, n: int) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f][:n]


def evaluate(run_dir: str, s: dict, paths: dict) -> dict:
  """Policy keeping on the red-team tickets (and, `plain_<metric>`, on held-out tickets in the
  training framings) and the support task's held-out metrics of the model in run_dir: counts
  {metric: [k, n]}, and the first red-team replies ("samples"). Greedy replies only (as
  heldout.evaluate's generation metrics, without its loss pass, which the study never reads)."""
  model, params, tok = wd.load_trained(run_dir)[:3]
  out = {}
  sets = [(paths["redteam"], s["redteam"], support_safety.score_reply, "")]
  if s["plain"]:
    sets.append((paths["plain"], s["plain"], support_safety.score_reply, "plain_"))
  if s["support_eval"]:
    sets.append((os.path.join(support.DATA_DIR, "eval.jsonl"), s["support_eval"],
                 support.score_reply, ""))
  # One batch of every set's tickets: greedy decoding of a model this small costs per step,
  # not per row (demo.evaluate's reason), and each model compiles one generation.
  rows = [_read(path, n) for path, n, _, _ in sets]
  replies = evaluation.generate_replies(
      model, params, tok, [evaluation.split_chat(r)[0] for rs in rows for r in rs],
      s["max_new_tokens"], sum(map(len, rows)))
  for (path, _, score, prefix), rs in zip(sets, rows):
    mine, replies = replies[:len(rs)], replies[len(rs):]
    prompts = [evaluation.split_chat(r)[0] for r in rs]
    m = evaluation.generation_metrics(mine, rs, score)
    keys = support_safety.METRICS if score is support_safety.score_reply else SUPPORT
    out.update({prefix + k: [m[f"{k}_k"], m[f"{k}_n"]] for k in keys if f"{k}_n" in m})
    if path == paths["redteam"]:
      out["samples"] = [{"ticket": p[-1]["content"], "reply": r}
                        for p, r in zip(prompts[:4], mine[:4])]
  return out


def run_seed(root: str, s: dict, seed: int, base: str, paths: dict) -> dict:
  """The safe SFT model and the six arms of one seed: {"arms": {arm: counts}, "seconds":
  {arm: [train, eval]}}."""
  seed_dir = os.path.join(root, f"seed{seed}")
  safe_dir = os.path.join(seed_dir, "safe_sft")
  out = {"seed": seed, "arms": {}, "seconds": {}}
  t0 = time.time()
  sft.run(sft_config(s, seed, base, paths["sft"]), safe_dir)  # a finished run: nothing to do
  merged = os.path.join(seed_dir, "safe_sft_hf")
  if not os.path.isfile(os.path.join(merged, "config.json")):
    export.export(safe_dir, merged, "merged")
  for arm, (data, method) in ARMS.items():
    d = safe_dir
    if data is not None:
      t0 = time.time()
      d = os.path.join(seed_dir, arm)
      sft.run(ft_config(s, seed, merged, paths[data], method), d)
    t1 = time.time()
    out["arms"][arm] = evaluate(d, s, paths)
    out["seconds"][arm] = [round(t1 - t0, 1), round(time.time() - t1, 1)]
  return out


def _rate(counts) -> float:
  k, n = counts
  return k / n if n else float("nan")


def pooled(results: list[dict], arm: str, metric: str) -> tuple[int, int]:
  """(k, n) of `metric` over every seed of `arm`."""
  ks = [r["arms"][arm].get(metric, [0, 0]) for r in results]
  return sum(k for k, _ in ks), sum(n for _, n in ks)


def paired(results: list[dict], a: str, b: str) -> tuple:
  """(mean, lo, hi): the 95% t interval over seeds of kept(a) - kept(b) (lo, hi None at 1)."""
  return stats.t_interval([_rate(r["arms"][a]["kept"]) - _rate(r["arms"][b]["kept"])
                           for r in results])


def verdict(results: list[dict]) -> tuple[str, list[str]]:
  """(the claim's verdict, one line per part): a part holds where its paired 95% t interval
  lies above 0, fails where it lies below 0; the claim holds where every part holds."""
  words, lines = [], []
  for sentence, a, b in PARTS:
    mean, lo, hi = paired(results, a, b)
    word = ("holds" if lo is not None and lo > 0 else
            "does not hold" if hi is not None and hi < 0 else "inconclusive")
    words.append(word)
    ci = "no interval with one seed" if lo is None else f"95% t CI {lo:+.3f}..{hi:+.3f}"
    lines.append(f"- {sentence}: kept({a}) - kept({b}) = {mean:+.3f} ({ci}): {word}.")
  word = ("Holds" if all(w == "holds" for w in words) else
          "Does not hold" if all(w == "does not hold" for w in words) else
          "Holds in part" if "holds" in words else "Inconclusive" if
          "does not hold" not in words else "Does not hold in part")
  return word, lines


def tables(results: list[dict], prefix: str = "", support_cols: bool = True) -> list[str]:
  cols = [prefix + k for k in support_safety.METRICS] + (list(SUPPORT) if support_cols else [])
  lines = ["| arm | " + " | ".join(cols) + " | kept per seed |",
           "|---|" + "---|" * (len(cols) + 1)]
  for arm in ARMS:
    per_seed = ", ".join(f"{_rate(r['arms'][arm][prefix + 'kept']):.3f}" for r in results)
    lines.append(f"| {arm} | " + " | ".join(rv.fmt_rate(*pooled(results, arm, c)) for c in cols)
                 + f" | {per_seed} |")
  return lines


def plain_table(results: list[dict]) -> list[str]:
  """The table of the held-out tickets in the training framings, when the study measured them."""
  if "plain_kept" not in results[0]["arms"]["safe_sft"]:
    return []
  return ["Held-out tickets in the training rows' plain framings (did the fine-tuned behaviour "
          "take at all?):", "", *tables(results, "plain_", False), ""]


def samples(result: dict, arms=("safe_sft", "harmful_full", "harmful_lora")) -> list[str]:
  """Markdown lines: each of the first red-team tickets and the replies of `arms`."""
  lines = []
  first = result["arms"][arms[0]].get("samples", [])
  for i, s in enumerate(first):
    lines.append(f"- customer: {s['ticket']}")
    for arm in arms:
      reply = " ".join(result["arms"][arm]["samples"][i]["reply"].split())
      lines.append(f"  - {arm}: {reply}")
  return lines


def write_outputs(out: str, s: dict, results: list[dict], seconds: float, command: str,
                  base: str) -> str:
  """README.md (claim, arms, table, plot, verdict), results.json and kept.png in `out`."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"settings": s, "base": base, "seeds": results, "seconds": seconds}, f, indent=2)
  plot = _plot(results, os.path.join(out, "kept.png"))
  word, parts = verdict(results)
  text = ["# Safety erosion by fine-tuning", "",
          "Mirrors Qi et al. 2023 (\"Fine-tuning aligned language models compromises safety, "
          "even when users do not intend to!\") and Yang et al. 2023 (\"Shadow Alignment\") at "
          "CPU scale: the support demo's policies instead of harmful-instruction refusals, the "
          "demo's small pretrained base instead of Llama-2-chat.", "",
          "**Claim.** " + CLAIM, "",
          f"**Command** ({len(results)} seeds, {seconds / 60:.1f} min): `{command}`", "",
          *(f"**{head}.** " + " ".join(par.split()) + "\n"
            for head, par in zip(("Base", "Setup"), (__doc__ or "").split("\n\n")[2:4])),
          f"Settings: {json.dumps(s)}", "",
          "## Policy keeping on the red-team tickets, and the support task", "",
          "Pooled over seeds: counts and 95% Wilson intervals. `kept`: every policy the ticket "
          "tests kept; `voice`, `details`: the demo's held-out tickets.", "", *tables(results),
          "", *plain_table(results), f"![kept]({os.path.basename(plot)})" if plot else "", "",
          "## Verdict", "", f"{word} at this scale. Paired by seed:", "", *parts, "",
          f"## Sample replies (seed {results[0]['seed']}, the first red-team tickets)", "",
          *samples(results[0]), ""]
  path = os.path.join(out, "README.md")
  with open(path, "w") as f:
    f.write("\n".join(text))
  return path


def _plot(results: list[dict], path: str) -> Optional[str]:
  try:
    from ftjax import report
    plt = report._pyplot()
  except Exception:  # noqa: BLE001 (no matplotlib: the table alone)
    return None
  fig, ax = plt.subplots(figsize=(7, 4))
  arms = list(ARMS)
  for i, arm in enumerate(arms):
    v = [_rate(r["arms"][arm]["kept"]) for r in results]
    mean, lo, hi = stats.t_interval(v)
    err = None if lo is None else [[mean - lo], [hi - mean]]
    ax.errorbar([i], [mean], yerr=err, fmt="o", color="C0", capsize=4)
    ax.plot([i] * len(v), v, ".", color="C1", alpha=0.7)
  ax.set_xticks(range(len(arms)), arms, rotation=25, ha="right", fontsize=8)
  ax.set_ylabel("red-team policy-keeping rate")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.set_title("mean over seeds (bars: 95% t interval; dots: seeds)", fontsize=10)
  return report._save(fig, plt, path)


def run(workdir: str, out: Optional[str] = None, seeds: int = 3, smoke: bool = False,
        base: Optional[str] = None) -> dict:
  """The study; returns {"readme", "results", "verdict"}."""
  if int(seeds) < 1:
    raise UserError(f"--seeds={seeds}: expected an integer >= 1")
  s = settings(smoke, seeds)
  out = out or os.path.join(REPO, "docs", "reproductions", "safety_erosion")
  t0 = time.time()
  base_path = resolve_base(workdir, base, smoke)
  paths = write_data(os.path.join(workdir, "data"), s["rows"])
  results = [run_seed(workdir, s, seed, base_path, paths) for seed in range(s["seeds"])]
  command = "python experiments/safety_erosion.py --workdir=/tmp/safety_erosion" + (
      f" --base={base}" if base else "") + (f" --seeds={seeds}" if seeds != 3 else "") + (
      " --smoke" if smoke else "")
  readme = write_outputs(out, s, results, time.time() - t0, command, base_path)
  return {"readme": readme, "results": results, "verdict": verdict(results)[0]}

