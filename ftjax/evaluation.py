"""Held-out evaluation: loss/perplexity over eval batches and generation metrics.

Generation metrics work on chat examples: the conversation before the last assistant turn is
the prompt, that turn is the reference. `exact_match` compares stripped strings; task metrics
(a task's `score_reply`, ftjax/tasks/) plug in as a function. Replies are sampled by
`rollout.rollout`, the one prompt -> pad -> sample path.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import numpy as np

from ftjax import rollout
from ftjax.data import prompts as prompt_data


def split_chat(example: dict) -> tuple[list[dict], str]:
  """(prompt messages, reference reply) of a chat example ending with an assistant turn."""
  msgs = example["messages"]
  if not msgs or msgs[-1]["role"] != "assistant":
    raise ValueError("eval example does not end with an assistant turn")
  return msgs[:-1], msgs[-1]["content"]


def generate_replies(model, params, tokenizer, prompts: Sequence[Sequence[dict]],
                     max_new_tokens: int = 64, batch_size: int = 16, temperature: float = 0.0,
                     seed: int = 0, max_prompt_len: Optional[int] = None) -> list[str]:
  """Greedy (or sampled) reply texts to chat prompts, batched and left-padded."""
  return [s["text"] for s in sample_replies(model, params, tokenizer, prompts, max_new_tokens,
                                            batch_size, temperature, seed, max_prompt_len)]


def generation_metrics(replies: Sequence[str], examples: Sequence[dict],
                       score: Optional[Callable[[str, dict], dict]] = None) -> dict:
  """exact_match (and the task score's means) of replies against their examples. A metric that
  is a rate of 0/1 outcomes also gets its counts, `<m>_k` of `<m>_n` scored replies (a NaN
  score, e.g. `details` of a ticket without details, is not scored), for its interval."""
  refs = [split_chat(e)[1].strip() for e in examples]
  matches = [float(r == ref) for r, ref in zip(replies, refs)]
  out = {"exact_match": float(np.mean(matches))}
  out.update(_counts("exact_match", matches))
  if score is not None:
    scores = [score(r, e) for r, e in zip(replies, examples)]
    for k in scores[0]:
      vals = [s[k] for s in scores if not np.isnan(s[k])]
      out[k] = float(np.mean(vals)) if vals else float("nan")
      out.update(_counts(k, vals))
  return out


def _counts(name: str, vals: Sequence[float]) -> dict:
  if not all(v in (0.0, 1.0) for v in vals):
    return {}
  return {f"{name}_k": int(sum(vals)), f"{name}_n": len(vals)}


def sample_replies(model, params, tokenizer, prompts: Sequence[Sequence[dict]],
                   max_new_tokens: int = 64, batch_size: int = 16, temperature: float = 1.0,
                   seed: int = 0, max_prompt_len: Optional[int] = None) -> list[dict]:
  """Sampled replies with their tokens and the policy's logprobs, per prompt:
  {"text", "prompt_tokens", "prompt_mask", "tokens", "mask", "logprobs"} (arrays per row), by
  `rollout.rollout`; `rollout.completion_logprobs` scores them under another model."""
  pad, eos = rollout.pad_id(tokenizer), rollout.eos_ids(tokenizer, model)
  out = []
  for start in range(0, len(prompts), batch_size):
    ids = [prompt_data.encode(tokenizer, p, max_prompt_len or 0)
           for p in prompts[start:start + batch_size]]
    # Filler prompts up to a fixed batch size: one compilation, and a row's sample does not
    # depend on how full its batch is.
    ro = rollout.rollout(model, params, ids + [[pad]] * (batch_size - len(ids)), n_samples=1,
                         max_new_tokens=max_new_tokens, rng=jax.random.PRNGKey(seed + start),
                         temperature=temperature, eos_ids=eos, pad_id=pad)
    texts = rollout.decode(tokenizer, ro)
    for i in range(len(ids)):
      out.append({"text": texts[i].strip(), "prompt_tokens": ro["prompt_tokens"][i],
                  "prompt_mask": ro["prompt_mask"][i], "tokens": ro["completion_tokens"][i],
                  "mask": ro["completion_mask"][i], "logprobs": ro["logprobs"][i]})
  return out
