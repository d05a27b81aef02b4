"""The model card (README.md) every export writes: Hugging Face's format, from the workdir.

`build(workdir, step, format, ...)` returns the card text: YAML metadata between `---` lines
(what `huggingface_hub.ModelCard.load` parses into `ModelCardData`), then the body.

Metadata: `base_model` (a hub id; a local base directory is named in the body only, as the hub
accepts no path there), `library_name` (`peft` for a PEFT adapter, `adapter-transformers` for
an AdapterHub one, `ftjax` otherwise),
`pipeline_tag` (`text-classification` for a reward model, `token-classification` for a
process reward model, else `text-generation`), `tags` (the
trainer, the adapter kind, `qlora` for a 4-bit base), `datasets` (hub names as such, local files
as `sha256:<content hash>`), `license` when the base directory's own card names one, and the
held-out metrics of the run's last eval at or before the exported step as `model-index`
eval results (the hub's metric layout).

Body: the training config's diff against the defaults of the config file (and arg) the run was
started with, the data (sources, rows, tokens, format; counts from run.json's `data_stats`), the
held-out metrics with 95% Wilson intervals where the run logged a rate's counts (`<m>_k`,
`<m>_n`), the git commit and library versions (run.json), and intended use and known
limitations: a template whose figures a task (ftjax/tasks/) fills with its `card_limitations`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
from typing import Any, Optional

from ftjax import metrics as metrics_lib, provenance, stats, tasks

# Config sections naming the trainer; a config with none of them: sft.
TRAINERS = ("dpo", "grpo", "ppo", "reward", "prm")
_PLACEHOLDER = "<!-- fill in -->"


_KIND = {"score": " (a Bradley-Terry reward model: one score per sequence)",
         "token": " (a process reward model: P(good step) at each step's separator token, "
                  "class 1 of an AutoModelForTokenClassification)"}


def trainer_of(config: dict) -> str:
  """sft | dpo | grpo | ppo | reward | prm, from the config's algorithm section."""
  return next((t for t in TRAINERS if t in config), "sft")


def _runs(workdir: str) -> list[dict]:
  try:
    with open(os.path.join(workdir, "run.json")) as f:
      runs = json.load(f).get("runs", [])
  except (OSError, ValueError, AttributeError):
    return []
  return [r for r in runs if isinstance(r, dict)]


def last_eval(workdir: str, step: Optional[int] = None) -> dict:
  """The metrics of the last record of metrics.jsonl with an `eval_*` key (at or before `step`),
  with its `step`; {} when the run never evaluated. Keys without the `eval_` prefix in that
  record (a task's counts logged beside) come along; `time` does not."""
  for record in reversed(metrics_lib.read_metrics(workdir)):
    if step is not None and record.get("step", -1) > step:
      continue
    if any(k.startswith("eval_") and not k.endswith("_before") for k in record):
      return {k: v for k, v in record.items() if k != "time"}
  return {}


# ------------------------------------------------------------------------------------------------
# The config's defaults


def _config_spec(runs: list[dict]) -> tuple[Optional[str], Optional[str]]:
  """(config file, arg) of `--config=FILE[:ARG]` in the first attempt's argv."""
  for run in runs[:1]:
    argv = run.get("argv") or []
    for i, a in enumerate(argv):
      value = None
      if a.startswith("--config="):
        value = a[len("--config="):]
      elif a == "--config" and i + 1 < len(argv):
        value = argv[i + 1]
      if value:
        path, _, arg = value.partition(":")
        if not os.path.isabs(path):
          path = os.path.join(run.get("cwd") or "", path)
        return path, arg or None
  return None, None


@contextlib.contextmanager
def _on_path(d: str):
  sys.path.insert(0, d)
  try:
    yield
  finally:
    sys.path.remove(d)


def config_defaults(runs: list[dict], trainer: str) -> tuple[Optional[dict], str]:
  """(defaults, what they are): `get_config(arg)` of the config file the run was started with,
  or of this checkout's configs/<trainer>.py; (None, why) when neither loads. A config file is
  Python the user ran to train; it is imported here (not the package's: ftjax does not import
  configs/), with the folder above configs/ on sys.path for its `from configs import common`."""
  path, arg = _config_spec(runs)
  if not path or not os.path.isfile(path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path, arg = os.path.join(root, "configs", f"{trainer}.py"), None
  if not os.path.isfile(path):
    return None, "no config file to compare with"
  try:
    spec = importlib.util.spec_from_file_location("_ftjax_card_config", path)
    module = importlib.util.module_from_spec(spec)
    with _on_path(os.path.dirname(os.path.dirname(os.path.abspath(path)))):
      spec.loader.exec_module(module)
      config = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # noqa: BLE001 (an old or edited config file: the card shows all keys)
    return None, f"{path} did not load ({type(e).__name__}: {e})"
  return provenance.config_dict(config), f"`{path}{':' + arg if arg else ''}`"


# ------------------------------------------------------------------------------------------------
# Data


def _is_hub(name: str) -> bool:
  return bool(name) and not os.path.exists(name) and not os.path.isabs(name) and \
      name.count("/") <= 1 and not name.startswith((".", "~"))


def data_sources(config: dict, hashes: dict) -> list[dict]:
  """[{split, kind: file|hub|tfds|task, name, sha256, rows}] of the config's data."""
  data = config.get("data") or {}
  out = []
  for split, path_key, src_key in (("train", "path", "sources"),
                                   ("eval", "eval_path", "eval_sources")):
    srcs = [{"path": p} for p in str(data.get(path_key) or "").split(",") if p]
    srcs += [s if isinstance(s, dict) else {"path": s} for s in data.get(src_key) or []]
    for s in srcs:
      if s.get("hub"):
        out.append({"split": split, "kind": "hub", "name": s["hub"]})
      elif s.get("tfds"):
        out.append({"split": split, "kind": "tfds", "name": s["tfds"]})
      elif s.get("path"):
        path = os.path.abspath(s["path"])
        digest = hashes.get(path)
        if digest is None and os.path.isfile(path):
          digest = provenance.data_hashes({"data": {"path": path}}).get(path)
        rows = None
        if os.path.isfile(path) and path.endswith((".jsonl", ".json", ".txt")):
          with open(path, errors="replace") as f:
            rows = sum(1 for line in f if line.strip())
        out.append({"split": split, "kind": "file", "name": path, "sha256": digest,
                    "rows": rows})
  if config.get("task"):
    out.append({"split": "train+eval", "kind": "task", "name": config["task"]})
  return out


def _dataset_ids(sources: list[dict]) -> list[str]:
  ids = []
  for s in sources:
    name = s["name"] if s["kind"] in ("hub", "tfds") else (
        f"sha256:{s['sha256']}" if s.get("sha256") else None)
    if name and name not in ids:
      ids.append(name)
  return ids


# ------------------------------------------------------------------------------------------------
# Metrics


def _count(v) -> Optional[int]:
  """A logged count (the writer stores every scalar as a float) as an int, or None."""
  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
      float(v) == int(v) and v >= 0:
    return int(v)
  return None


def metric_rows(metrics: dict) -> list[tuple[str, float, str]]:
  """[(name, value, 95% interval text)] of the eval metrics; the counts `<m>_k`, `<m>_n` of a
  rate give its Wilson interval and are not rows of their own."""
  counts = {k for k in metrics for m in (k[:-2],) if k.endswith(("_k", "_n")) and m in metrics}
  rows = []
  for k, v in metrics.items():
    if k == "step" or k in counts or not isinstance(v, (int, float)) or isinstance(v, bool):
      continue
    kk, n = _count(metrics.get(f"{k}_k")), _count(metrics.get(f"{k}_n"))
    if kk is not None and n and kk <= n:
      _, lo, hi = stats.wilson(kk, n)
      ci = f"{kk}/{n}; Wilson [{100 * lo:.1f}%, {100 * hi:.1f}%]"
    else:
      ci = "n/a"
    rows.append((k, float(v), ci))
  return rows


def _fmt(v: float) -> str:
  return format(v, ".6g")


# ------------------------------------------------------------------------------------------------
# The card


def _base(config: dict) -> tuple[Optional[str], str, Optional[str]]:
  """(hub id or None, how the body names the base, license from a local base's card)."""
  m = config.get("model") or {}
  path = m.get("hf_path") or ""
  if not path:
    return None, f"none: ftjax preset `{m.get('preset')}` trained from random init", None
  if os.path.isdir(path):
    lic = None
    readme = os.path.join(path, "README.md")
    if os.path.isfile(readme):
      try:
        from huggingface_hub import ModelCard
        lic = ModelCard.load(readme).data.license
      except Exception:  # noqa: BLE001 (a base card we cannot parse names no license)
        lic = None
    return None, f"local directory `{os.path.abspath(path)}`", lic
  return path, f"[{path}](https://huggingface.co/{path})", None


def _tags(config: dict, trainer: str, fmt: str) -> list[str]:
  a, q = config.get("adapter") or {}, config.get("quant") or {}
  kind = a.get("kind", "none")
  tags = ["ftjax", "jax", trainer]
  if kind == "lora":
    tags.append("dora" if a.get("dora") else "lora")
    if q.get("kind", "none") != "none":
      tags += ["qlora", q["kind"]]
  elif kind in ("prefix", "prompt"):
    tags.append(f"{kind}-tuning")
  elif kind == "none":
    tags.append("full-fine-tune")
  else:
    tags.append(kind)
  if trainer == "reward":
    tags.append("reward-model")
  if fmt == "merged" and kind == "lora":
    tags.append("merged")
  return tags


def _md_value(v: Any) -> str:
  return "`" + json.dumps(v, default=str).replace("|", "\\|") + "`"


# The hub's library name per export format (AdapterHub's adapters are `adapter-transformers`).
_LIBRARY = {"peft": "peft", "adapterhub": "adapter-transformers"}


def build(workdir: str, step: int, fmt: str, config: dict, params_count: Optional[dict] = None
          ) -> str:
  """The README.md text of an export of `workdir`'s checkpoint `step` in format `fmt`
  (merged | peft | adapterhub), `config` the run's config as a dict; `params_count` {"total",
  "trainable"} for the body."""
  from huggingface_hub import EvalResult, ModelCard, ModelCardData

  runs = _runs(workdir)
  last = runs[-1] if runs else {}
  trainer = trainer_of(config)
  head = (config.get("model") or {}).get("head")
  reward = head == "score"
  if reward:
    trainer = "reward"
  base_id, base_text, lic = _base(config)
  sources = data_sources(config, last.get("data_hashes") or {})
  evals = last_eval(workdir, step)
  rows = metric_rows(evals)
  name = os.path.basename(os.path.abspath(workdir)) or "ftjax-model"
  pipeline = {"score": "text-classification", "token": "token-classification"}.get(
      head, "text-generation")
  data_name = next((os.path.basename(s["name"]) for s in sources if s["split"] == "eval"),
                   "held-out split of the training data")
  data_id = next((d for s in sources if s["split"] == "eval" for d in _dataset_ids([s])),
                 "ftjax-held-out")
  results = [EvalResult(task_type=pipeline, dataset_type=data_id, dataset_name=data_name,
                        dataset_split="eval", metric_type=k, metric_name=k, metric_value=v)
             for k, v, _ in rows if math.isfinite(v)]
  card_data = ModelCardData(
      base_model=base_id, library_name=_LIBRARY.get(fmt, "ftjax"),
      pipeline_tag=pipeline, tags=_tags(config, trainer, fmt),
      datasets=_dataset_ids(sources) or None, license=lic,
      model_name=name if results else None, eval_results=results or None)

  out = [f"# {name}", ""]
  what = {"merged": "merged Hugging Face model (adapter folded into the weights)",
          "peft": "PEFT adapter (load it over the base model with `peft.PeftModel`)",
          "adapterhub": "bottleneck adapter in the adapters library's layout (AdapterHub: "
                        "`adapters.init(model)`, then `model.load_adapter(dir)` over the base "
                        "model)"}[fmt]
  out += [f"A {what}, trained with ftjax's `{trainer}` trainer"
          f"{_KIND.get(head, '')}.",
          "", f"- Base model: {base_text}",
          f"- Adapter: `{(config.get('adapter') or {}).get('kind', 'none')}`; quantized base: "
          f"`{(config.get('quant') or {}).get('kind', 'none')}`",
          f"- Checkpoint: step {step} of `{os.path.abspath(workdir)}`"]
  if params_count:
    out.append(f"- Parameters: {params_count['total']:,} ({params_count['trainable']:,} "
               "trained)")
  out += ["", "## Training config", ""]
  defaults, against = config_defaults(runs, trainer)
  if defaults is None:
    out += [f"Defaults unavailable ({against}); the full config:", "", "```json",
            json.dumps(config, indent=2, default=str), "```"]
  else:
    diff = provenance.config_diff(defaults, config)
    out += [f"Differences from the defaults of {against} (the resolved config is the "
            "workdir's config.json):", ""]
    if diff:
      out += ["| key | default | this run |", "|---|---|---|"]
      out += [f"| `{k}` | {_md_value(a)} | {_md_value(b)} |" for k, (a, b) in diff.items()]
    else:
      out.append("None: the config file's defaults.")
  if runs and runs[0].get("argv"):
    out += ["", "Command: `" + " ".join(runs[0]["argv"]) + "`"]

  out += ["", "## Data", ""]
  d = config.get("data") or {}
  out.append(f"Format: `{d.get('format', 'n/a')}`; packing: `{d.get('packing', 'n/a')}`; "
             f"seq_len: `{(config.get('train') or {}).get('seq_len')}`.")
  out.append("")
  if sources:
    out += ["| split | source | sha256 | rows |", "|---|---|---|---|"]
    for s in sources:
      digest = f"`{s['sha256']}`" if s.get("sha256") else "n/a"
      out.append(f"| {s['split']} | {s['kind']}: `{s['name']}` | {digest} | "
                 f"{s['rows'] if s.get('rows') is not None else 'n/a'} |")
  else:
    out.append("No data source in the config.")
  ds = last.get("data_stats") or {}
  if ds:
    out += ["", "| split | examples | tokens | target tokens | truncated | dropped |",
            "|---|---|---|---|---|---|"]
    for split in ("train", "eval"):
      s = ds.get(split) or {}
      if s:
        out.append(f"| {split} | {s.get('examples')} | {s.get('tokens')} | "
                   f"{s.get('target_tokens')} | {s.get('truncated')} | {s.get('dropped')} |")

  out += ["", "## Held-out metrics", ""]
  if rows:
    out += [f"The run's last eval at or before the exported step (step {evals.get('step')}, "
            "from `metrics.jsonl`); 95% intervals are Wilson intervals of the rates whose "
            "counts the run logged.", "", "| metric | value | 95% interval |", "|---|---|---|"]
    out += [f"| {k} | {_fmt(v)} | {ci} |" for k, v, ci in rows]
  else:
    out.append("The run never evaluated on held-out data.")

  out += ["", "## Provenance", ""]
  if last:
    git = last.get("git") or {}
    commits = sorted({str((r.get("git") or {}).get("commit")) for r in runs})
    out.append(f"- ftjax git commit: `{git.get('commit')}`" +
               (" (uncommitted changes)" if git.get("dirty") else "") +
               (f"; the run's attempts used {', '.join(commits)}" if len(commits) > 1 else ""))
    out.append(f"- Started: {runs[0].get('start_time')}; attempts: {len(runs)}")
    vers = last.get("versions") or {}
    out.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v))
    jx = last.get("jax") or {}
    if jx:
      out.append(f"- Devices: {jx.get('backend')} {jx.get('device_kinds')}")
  else:
    out.append("No run.json in the workdir: provenance unknown.")

  task = tasks.get((config.get("task") or "")) if config.get("task") else None
  figures = list(getattr(task, "card_limitations", lambda m: [])(evals)) if task else []
  out += ["", "## Intended use", "",
          f"{_PLACEHOLDER} What this model is for, who may use it, and in what setting.",
          "", "## Known limitations", ""]
  out += [f"- {f}" for f in figures]
  out += ["- Trained on the data above only: inputs unlike it (topics, languages, formats) "
          "are outside what was measured.",
          "- The held-out metrics are from the run's own eval split; they say nothing about "
          "other data.",
          f"- {_PLACEHOLDER} Failure rates measured on your own data "
          "(`python experiments/eval.py --model=THIS_DIR --data=FILE --task=...`)."]
  if trainer in ("dpo", "grpo", "ppo", "reward", "prm"):
    out.append("- Preference and reward training optimise a proxy: check replies for reward "
               "hacking (length, flattery, format) before trusting the scores.")
  body = "\n".join(out) + "\n"
  return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}").content
