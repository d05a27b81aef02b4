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



# ------------------------------------------------------------------ several adapters, one batch


def parse_adapter_flags(values) -> dict[str, str]:
  """--adapter values (NAME=DIR, or DIR in PEFT's multi-adapter layout) -> name -> directory."""
  from ftjax import adapters
  out: dict[str, str] = {}
  for v in values:
    if "=" in v:
      name, path = v.split("=", 1)
      found = {name.strip(): path}
      if not name.strip():
        raise UserError(f"--adapter={v}: expected NAME=DIR (or a PEFT multi-adapter DIR)")
    else:
      found = adapters.peft_dirs(v)
    for name, path in found.items():
      if name in out:
        raise UserError(f"--adapter={v}: adapter name {name!r} is given twice")
      out[name] = path
  return out


def read_requests(path: str) -> list[dict]:
  """Rows of a requests JSON-lines file: {"prompt": str} or {"messages": [...]}, each with an
  optional "adapter" (a loaded adapter's name; absent or null: the base model)."""
  if not os.path.isfile(path):
    raise UserError(f"--requests={path}: no such file")
  rows = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{i}: invalid JSON ({e.msg})") from None
      if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
        raise UserError(f"{path}:{i}: expected an object with \"prompt\" or \"messages\"")
      text = row.get("prompt", row.get("messages"))
      if not text or not isinstance(text, (str, list)):
        raise UserError(f"{path}:{i}: empty or non-text \"prompt\"/\"messages\"")
      adapter = row.get("adapter")
      if adapter is not None and not isinstance(adapter, str):
        raise UserError(f"{path}:{i}: \"adapter\" must be a name or null")
      rows.append({"prompt": text, "adapter": adapter, "line": i})
  if not rows:
    raise UserError(f"{path}: no requests")
  return rows


def _base_of(adapter_dirs: dict[str, str], base: str | None) -> tuple[str, str | None]:
  """(base HF directory, tokenizer directory or None) the adapters are served on: `base`,
  else the first PEFT adapter's base_model_name_or_path or workdir's model.hf_path."""
  from ftjax.train import setup
  if base:
    return base, None
  for path in adapter_dirs.values():
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
      return adapter_base(path), (path if _has_tokenizer(path) else None)
    if os.path.isfile(os.path.join(path, "config.json")):  # an ftjax workdir
      config = wd.load_config(path)
      if config.model.hf_path:
        return config.model.hf_path, setup.tokenizer_path(config)
  raise UserError("--adapter: no adapter names its base model; pass --model=HF_DIR")


def generate_multi(adapter_flags, requests_path, base=None, tokenizer_path=None, chat=False,
                   system=None, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
                   n_samples=1, seed=0, dtype="float32", compute_dtype=None,
                   attention="xla") -> list[str]:
  """Serve every request in one batch, each row on its own adapter (ftjax/adapters.py).

  `adapter_flags`: --adapter values; `base`: the base HF directory (default: see `_base_of`).
  Returns the completions as `generate_texts` does (n_samples per request, grouped).
  """
  from ftjax import adapters
  for name, value in (("max_new_tokens", max_new_tokens), ("n_samples", n_samples)):
    if int(value) < 1:
      raise UserError(f"--{name}={value}: expected an integer >= 1")
  dirs = parse_adapter_flags(adapter_flags)
  rows = read_requests(requests_path)
  for r in rows:  # an unknown name fails before any model loads
    if r["adapter"] not in (None, "") and r["adapter"] not in dirs:
      raise UserError(f"{requests_path}:{r['line']}: adapter {r['adapter']!r} is not loaded "
                      f"(--adapter gives: {', '.join(dirs)})")
  base_path, tok_dir = _base_of(dirs, base)
  model, params = hf.load_pretrained(base_path, dtype=dtype, compute_dtype=compute_dtype,
                                     attention=attention)
  tokenizer = load_tokenizer(tokenizer_path or tok_dir or hf.resolve(base_path))
  model, params = adapters.load_adapters(model, params, dirs)
  ids = []
  for r in rows:
    p = r["prompt"]
    if isinstance(p, str) and chat:
      p = ([{"role": "system", "content": system}] if system else []) + [
          {"role": "user", "content": p}]
    if isinstance(p, list) and not getattr(tokenizer, "chat_template", None):
      raise UserError(f"{requests_path}:{r['line']}: \"messages\" (or --chat): the tokenizer "
                      "has no chat_template")
    x = prompt_data.encode(tokenizer, p) if isinstance(p, list) else tokenizer(p)["input_ids"]
    if not x:
      raise UserError(f"{requests_path}:{r['line']}: no tokens to start from")
    ids.append(x)
  index = adapters.adapter_rows(model, [r["adapter"] for r in rows], requests_path)
  t0 = time.perf_counter()
  ro = rollout.rollout(model, params, ids, n_samples=n_samples, max_new_tokens=max_new_tokens,
                       rng=jax.random.PRNGKey(seed), temperature=temperature, top_k=top_k,
                       top_p=top_p, eos_ids=rollout.eos_ids(tokenizer, model),
                       pad_id=rollout.pad_id(tokenizer), adapter_rows=index)
  logging.info("generated %d tokens for %d requests on %d adapters in %.2fs (including "
               "compilation)", int(ro["completion_mask"].sum()), len(rows), len(dirs),
               time.perf_counter() - t0)
  return rollout.decode(tokenizer, ro)
