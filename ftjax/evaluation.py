"""Held-out evaluation: loss/perplexity over eval batches and generation metrics.

Generation metrics work on chat examples: the conversation before the last assistant turn is
the prompt, that turn is the reference. `exact_match` compares stripped strings; task metrics
(the support demo's `score_reply`) plug in as a function.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import numpy as np

from ftjax import sampling


def chat_prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
  text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
  return tokenizer(text, add_special_tokens=False)["input_ids"]


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


def left_pad(ids: Sequence[Sequence[int]], pad_id: int, rows: Optional[int] = None):
  """Token lists -> left-padded int32 [rows, T] and bool mask; extra filler rows are valid
  single pad tokens (the sampler wants the last column unmasked)."""
  rows = rows or len(ids)
  t = max(len(x) for x in ids)
  tokens = np.full((rows, t), pad_id, np.int32)
  mask = np.zeros((rows, t), bool)
  for i, x in enumerate(ids):
    tokens[i, t - len(x):], mask[i, t - len(x):] = x, True
  mask[len(ids):, -1] = True
  return tokens, mask


def response_logprobs(model, params, prompt_tokens, prompt_mask, tokens, mask) -> np.ndarray:
  """Training-forward logprobs [B, M] of sampled `tokens` [B, M] after left-padded prompts
  (0 where `mask` is False): what the reference model assigns to the policy's samples."""
  seq = np.concatenate([prompt_tokens, tokens], axis=1)
  full_mask = np.concatenate([prompt_mask, mask], axis=1)
  logits = model.apply({"params": params}, seq, mask=full_mask)
  t = prompt_tokens.shape[1]
  lp = jax.nn.log_softmax(logits[:, t - 1:-1].astype(np.float32), axis=-1)
  picked = np.take_along_axis(np.asarray(lp), tokens[..., None].astype(np.int64), -1)[..., 0]
  return np.where(mask, picked, 0.0)


def sample_replies(model, params, tokenizer, prompts: Sequence[Sequence[dict]],
                   max_new_tokens: int = 64, batch_size: int = 16, temperature: float = 1.0,
                   seed: int = 0, max_prompt_len: Optional[int] = None) -> list[dict]:
  """Sampled replies with their tokens and the policy's logprobs, per prompt:
  {"text", "prompt_tokens", "prompt_mask", "tokens", "mask", "logprobs"} (arrays per row)."""
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  eos = sorted({e for e in (tokenizer.eos_token_id, model.cfg.eos_token_id)
                if isinstance(e, int)})
  out = []
  for start in range(0, len(prompts), batch_size):
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
    if max_prompt_len:
      ids = [x[-max_prompt_len:] for x in ids]
    tokens, mask = left_pad(ids, pad, batch_size)  # a fixed batch size keeps one compilation
    res = sampling.generate(model, params, tokens, mask, max_new_tokens=max_new_tokens,
                            rng=jax.random.PRNGKey(seed + start), temperature=temperature,
                            eos_id=eos or None, pad_id=pad)
    toks, keep, lps = map(np.asarray, (res.tokens, res.mask, res.logprobs))
    for i in range(len(ids)):
      out.append({"text": tokenizer.decode(toks[i][keep[i]], skip_special_tokens=True).strip(),
                  "prompt_tokens": tokens[i], "prompt_mask": mask[i], "tokens": toks[i],
                  "mask": keep[i], "logprobs": lps[i]})
  return out
