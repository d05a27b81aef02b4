"""The demo's second adapter (issue 21): another brand's voice on the same base, served beside
the first in one batch.

  python experiments/demo.py --workdir=/tmp/ftjax_demo --second_adapter

After the demo's LoRA SFT (the Lumen Outfitters voice), a second LoRA adapter trains on the same
base with the same config on the same tickets re-rendered for Northwind Supply (its name, its
greeting, its signature: ftjax/tasks/support_brands.py). Then both adapters load over the one
base (`ftjax.load_adapters`: never merged, never copied) and answer the held-out tickets in ONE
batch, each row gathering its own adapter: the first half of the tickets as Lumen tickets on
the Lumen adapter, the second half as Northwind tickets on the Northwind adapter. Reported per
adapter: its own brand voice (greeting by name + its signature), the other brand's signature
(a leak between adapters), and the order details quoted, with counts and 95% Wilson intervals.
"""

from __future__ import annotations

import copy
import json
import os
import time

import jax
import numpy as np

from ftjax import adapters, evaluation, hf, rollout, stats
from ftjax.data import prompts as prompt_data
from ftjax.tasks import support, support_brands as sb
from ftjax.tokenizer import load_tokenizer
from ftjax.train import sft

NAMES = ("lumen", "northwind")  # the adapters: the demo's, then the second brand's


def write_rows(out_dir: str, brand: sb.Brand) -> dict:
  """The demo's train and eval tickets re-rendered for `brand`: {split: path}."""
  paths = {}
  for split in ("train", "eval"):
    with open(os.path.join(support.DATA_DIR, f"{split}.jsonl")) as f:
      rows = [sb.rebrand(json.loads(line), brand) for line in f]
    paths[split] = os.path.join(out_dir, f"{split}.jsonl")
    support.write_jsonl(paths[split], rows)
  return paths


def serve_both(base: str, dirs: dict, rows: list, names: list, max_new_tokens: int = 64
               ) -> list[str]:
  """Greedy replies to the chat `rows`, row i on adapter `names[i]` of `dirs`, in one batch."""
  model, params = hf.load_pretrained(base)
  tok = load_tokenizer(base)
  model, params = adapters.load_adapters(model, params, dirs)
  ids = [prompt_data.encode(tok, evaluation.split_chat(r)[0]) for r in rows]
  ro = rollout.rollout(model, params, ids, n_samples=1, max_new_tokens=max_new_tokens,
                       rng=jax.random.PRNGKey(0), temperature=0.0,
                       eos_ids=rollout.eos_ids(tok, model), pad_id=rollout.pad_id(tok),
                       adapter_rows=adapters.adapter_rows(model, names))
  return [t.strip() for t in rollout.decode(tok, ro)]


def run(sft_config, workdir: str, first_dir: str, eval_examples: int = 0) -> dict:
  """Train the Northwind adapter with the demo's SFT config (`sft_config`, its base in
  model.hf_path), serve it beside the demo's (`first_dir`) and score both."""
  t0 = time.time()
  data = write_rows(os.path.join(workdir, "northwind_data"), sb.NORTHWIND)
  cfg = copy.deepcopy(sft_config)
  cfg.data.path, cfg.data.eval_path = data["train"], data["eval"]
  second_dir = os.path.join(workdir, "sft_northwind")
  sft.run(cfg, second_dir)
  with open(os.path.join(support.DATA_DIR, "eval.jsonl")) as f:
    tickets = [json.loads(line) for line in f]
  tickets = tickets[:eval_examples] if eval_examples else tickets
  half = len(tickets) // 2
  names = [NAMES[0]] * half + [NAMES[1]] * (len(tickets) - half)
  rows = [t if n == "lumen" else sb.rebrand(t, sb.NORTHWIND) for t, n in zip(tickets, names)]
  replies = serve_both(cfg.model.hf_path, {NAMES[0]: first_dir, NAMES[1]: second_dir}, rows,
                       names)
  out = {"adapters": {}, "dirs": {NAMES[0]: first_dir, NAMES[1]: second_dir},
         "replies": [{"adapter": n, "reply": x} for n, x in zip(names, replies)]}
  for name in NAMES:
    brand, other = sb.BRANDS[name], sb.BRANDS[NAMES[1 - NAMES.index(name)]]
    mine = [(r, x) for r, x, n in zip(rows, replies, names) if n == name]
    voice = [sb.voice(x, r["meta"]["name"], brand) for r, x in mine]
    leak = [float(other.signature in x) for _, x in mine]
    details = [support.score_reply(x, r)["details"] for r, x in mine]
    details = [d for d in details if not np.isnan(d)]
    out["adapters"][name] = {
        "brand": brand.name, "voice": [int(sum(voice)), len(voice)],
        "other_signature": [int(sum(leak)), len(leak)],
        "details": [int(sum(details)), len(details)],
        "sample": {"ticket": rows[names.index(name)]["messages"][1]["content"],
                   "reply": replies[names.index(name)]}}
  out["seconds"] = time.time() - t0
  return out


def format_lines(r: dict) -> list[str]:
  """The report's lines: per adapter, its rates with counts and Wilson intervals."""
  lines = ["", "Two adapters on one base, served in one batch (held-out tickets, half each): "
           "counts and 95% Wilson intervals"]
  for name, a in r["adapters"].items():
    lines.append(f"  {name} adapter ({a['brand']}):")
    for key, label in (("voice", "own brand voice"), ("other_signature",
                                                       "the other brand's signature"),
                       ("details", "order details quoted")):
      if a[key][1]:
        lines.append("    " + stats.format_proportion(label, *a[key]))
    lines += [f"    customer: {a['sample']['ticket']}", f"      assistant: {a['sample']['reply']}"]
  lines.append(f"  second adapter: {r['dirs'][NAMES[1]]} ({r['seconds']:.0f}s)")
  return lines
