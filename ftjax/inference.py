"""Sample from an HF model directory, a PEFT adapter directory or an ftjax workdir with the
KV-cache sampler (experiments/generate.py).

Prompts are one batch, left-padded; `chat` renders each as a user turn with the tokenizer's chat
template (optionally after a system message). An adapter directory (adapter_config.json +
adapter_model.safetensors) loads on `base`, else on its config's `base_model_name_or_path`; its
tokenizer is the adapter directory's when it holds one, else the base's.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
import jax

from ftjax import hf, rollout, workdir as wd
from ftjax.data import prompts as prompt_data
from ftjax.errors import UserError
from ftjax.peft_io import load_adapter
from ftjax.tokenizer import load_tokenizer


def encode_prompts(tokenizer, prompts, chat=False, system=None):
  """Token ids per prompt, rendered with the chat template when asked."""
  ids = []
  for p in prompts:
    if chat:
      if not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat: the tokenizer has no chat_template")
      messages = ([{"role": "system", "content": system}] if system else []) + [
          {"role": "user", "content": p}]
      ids.append(prompt_data.encode(tokenizer, messages))
    else:
      ids.append(tokenizer(p)["input_ids"])  # as the tokenizer adds (or not) its BOS
  for p, x in zip(prompts, ids):
    if not x:
      raise UserError(f"--prompt={p!r}: no tokens to start from")
  return ids


def adapter_base(adapter_dir: str, base: str | None = None) -> str:
  """The base model of a PEFT adapter directory: `base`, else its adapter config's."""
  if base:
    return base
  cfg_path = os.path.join(adapter_dir, "adapter_config.json")
  try:
    with open(cfg_path) as f:
      base = json.load(f).get("base_model_name_or_path")
  except json.JSONDecodeError as e:
    raise UserError(f"{cfg_path}: invalid JSON ({e.msg}, line {e.lineno})") from None
  if not base:
    raise UserError(f"{cfg_path}: no base_model_name_or_path; pass --base=HF_DIR")
  return base


def _has_tokenizer(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, f))
             for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def generate_texts(model_path, prompts, tokenizer_path=None, chat=False, system=None,
                   max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, n_samples=1, seed=0,
                   dtype="float32", compute_dtype=None, attention="xla", base=None) -> list[str]:
  """Generate completions; returns a list of strings (n_samples per prompt, grouped).

  model_path is an HF directory (or hub name), a PEFT adapter directory (on `base` or the base
  its config names) or an ftjax training workdir (its latest checkpoint, adapters applied).
  """
  # Checked before the model loads: 0 new tokens decodes nothing (the sampler would fail on it).
  for name, value in (("max_new_tokens", max_new_tokens), ("n_samples", n_samples)):
    if int(value) < 1:
      raise UserError(f"--{name}={value}: expected an integer >= 1")
  is_adapter = (os.path.exists(os.path.join(model_path, "adapter_config.json"))
                and not os.path.exists(os.path.join(model_path, "config.json")))
  if is_adapter:
    base_path = adapter_base(model_path, base)
    model, params = hf.load_pretrained(base_path, dtype=dtype, compute_dtype=compute_dtype,
                                       attention=attention)
    model, params = load_adapter(model, params, model_path)
    tokenizer = load_tokenizer(tokenizer_path or (
        model_path if _has_tokenizer(model_path) else hf.resolve(base_path)))
  elif os.path.isdir(os.path.join(model_path, "checkpoints")):
    model, params, tokenizer, _ = wd.load_trained(model_path)
    if tokenizer_path:
      tokenizer = load_tokenizer(tokenizer_path)
  else:
    model, params = hf.load_pretrained(model_path, dtype=dtype, compute_dtype=compute_dtype,
                                       attention=attention)
    tokenizer = load_tokenizer(tokenizer_path or hf.resolve(model_path))
  ids = encode_prompts(tokenizer, prompts, chat, system)
  t0 = time.perf_counter()
  ro = rollout.rollout(model, params, ids, n_samples=n_samples, max_new_tokens=max_new_tokens,
                       rng=jax.random.PRNGKey(seed), temperature=temperature, top_k=top_k,
                       top_p=top_p, eos_ids=rollout.eos_ids(tokenizer, model),
                       pad_id=rollout.pad_id(tokenizer))
  dt = time.perf_counter() - t0
  logging.info("generated %d tokens in %.2fs (including compilation)",
               int(ro["completion_mask"].sum()), dt)
  return rollout.decode(tokenizer, ro)

