"""Evaluate a workdir checkpoint or an HF model directory on held-out data (experiments/eval.py).

Held-out loss and perplexity (completion / assistant tokens only) and, for chat data,
generation metrics of greedy replies: exact match, plus the task's own metrics
(`task="support"`: order details quoted, invented order numbers, escalations, brand voice).

The loss counts come too: `examples` (read), `loss_examples` (in the loss), `truncated`
(cut at `seq_len`, still in the loss) and `dropped` (no completion token within `seq_len`: left
out of the loss, with a warning). Rates come with their counts and a 95% Wilson interval
(`invented_k`, `invented_n`, `invented_ci95: [lo, hi]`).
"""

from __future__ import annotations

import functools
import json
import os

from absl import logging
import jax
import numpy as np

from ftjax import data as data_lib, evaluation, hf, stats, tasks, workdir as wd
from ftjax.errors import UserError
from ftjax.tokenizer import load_tokenizer
from ftjax.train import sft

TASKS = {"none": None, **tasks.reply_scorers()}


def load(workdir=None, model_path=None, step=None):
  """(model, params, tokenizer) of a workdir checkpoint or an HF model directory."""
  if workdir:
    model, params, tok, _ = wd.load_trained(workdir, step)
    return model, params, tok
  if not model_path:
    raise UserError("one of --workdir or --model is required")
  model, params = hf.load_pretrained(model_path)
  return model, params, load_tokenizer(hf.resolve(model_path))


@functools.lru_cache(maxsize=16)
def _eval_fn_jit(model):
  return jax.jit(lambda p, b: sft.eval_step(p, b, model=model))


def _eval_fn(model):
  """The jitted loss pass, one per model (modules with equal configs are equal): a new closure
  per call was traced and lowered again for each measured model and data file (the repro
  studies measure every arm and the base on two files)."""
  try:
    return _eval_fn_jit(model)
  except TypeError:  # an unhashable field
    return _eval_fn_jit.__wrapped__(model)


def evaluate(data_path, workdir=None, model_path=None, step=None, fmt="chat", task="none",
             seq_len=512, batch_size=16, max_examples=0, max_new_tokens=64, show=3,
             loaded=None, add_bos=None) -> dict:
  """Metrics dict (and `samples`: a few prompt/reply/reference triples) of the model in
  `workdir` (checkpoint `step`, default the latest), in `model_path`, or `loaded`
  (model, params, tokenizer). `add_bos`: `data.add_bos` for plain-text formats (None: the
  tokenizer's own special tokens)."""
  model, params, tok = loaded or load(workdir, model_path, step)
  source = {"path": data_path, "format": fmt, "add_bos": add_bos}
  if max_examples:
    source["limit"] = max_examples
  records = list(data_lib.load_records(source))
  data = data_lib.build_dataset({"sources": [source], "packing": False}, tok, seq_len,
                                batch_size)
  counts = {"examples": len(records), "loss_examples": data.stats.examples,
            "truncated": data.stats.truncated, "dropped": data.stats.dropped}
  if data.stats.dropped:
    logging.warning("--seq_len=%d: %d of %d examples of %s have no completion token within it "
                    "and are left out of eval_loss (%d evaluated, %d of them truncated)",
                    seq_len, data.stats.dropped, len(records), data_path,
                    data.stats.examples, data.stats.truncated)
  eval_fn = _eval_fn(model)
  loss_sum = n = 0.0
  for batch in data_lib.eval_batches(data.train.examples, batch_size, seq_len, pad_id=data.pad_id):
    out = jax.device_get(eval_fn(params, batch))
    loss_sum, n = loss_sum + float(out["loss_sum"]), n + float(out["target_tokens"])
  metrics = {"eval_loss": loss_sum / max(n, 1), "eval_ppl": float(np.exp(loss_sum / max(n, 1))),
             **counts}
  if fmt == "chat":
    prompts = [evaluation.split_chat(r)[0] for r in records]
    replies = evaluation.generate_replies(model, params, tok, prompts, max_new_tokens,
                                          batch_size)
    metrics.update(stats.add_wilson(evaluation.generation_metrics(replies, records,
                                                                  TASKS[task])))
    metrics["samples"] = [{"prompt": p[-1]["content"], "reply": r,
                           "reference": evaluation.split_chat(e)[1]}
                          for p, r, e in list(zip(prompts, replies, records))[:show]]
  return metrics


def check_out(out: str):
  """`--out` must be a file in a directory that exists and is writable: refused before the
  evaluation runs, not after it."""
  if os.path.isdir(out):
    raise UserError(f"--out={out}: is a directory; give a file, e.g. "
                    f"--out={os.path.join(out, 'eval.json')}")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise UserError(f"--out={out}: directory {parent} does not exist")
  if not os.access(parent, os.W_OK):
    raise UserError(f"--out={out}: directory {parent} is not writable")


def write_json(path: str, obj: dict):
  tmp = f"{path}.tmp{os.getpid()}"  # whole or not at all: an older eval.json is not cut short
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)

