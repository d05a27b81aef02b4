"""Sample from a Hugging Face model directory with ftjax's KV-cache sampler.

  python experiments/generate.py --model=/path/to/hf_dir --prompt="Where is my order?" \
      --chat --max_new_tokens=64 --temperature=0.7 --top_p=0.9

`--prompt` may be given several times (one batch, left-padded). `--chat` renders each prompt
as a user turn with the tokenizer's chat template (optionally after `--system`).

`--model` may also be a PEFT adapter directory (adapter_config.json + adapter_model.safetensors):
its base is `--base`, else the adapter config's `base_model_name_or_path`; the tokenizer is the
adapter directory's when it holds one, else the base's.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from ftjax import cli, rollout  # noqa: E402
from ftjax.data import prompts as prompt_data  # noqa: E402
from ftjax.errors import UserError  # noqa: E402
import ftjax  # noqa: E402
from ftjax.tokenizer import load_tokenizer  # noqa: E402


def define_flags():
  """Flags exist only when run as a script, so that tests and demo.py can import
  several experiment modules into one process without flag clashes."""
  flags.DEFINE_string("model", None, "HF model directory (config.json + safetensors), hub name, "
                      "or an ftjax training workdir.")
  flags.DEFINE_string("base", None, "Base model for a PEFT adapter --model (default: the "
                      "adapter config's base_model_name_or_path).")
  flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: --model).")
  flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat the flag for a batch.")
  flags.DEFINE_bool("chat", False, "Render prompts with the tokenizer's chat template.")
  flags.DEFINE_string("system", None, "System message for --chat.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate (>= 1).", lower_bound=1)
  flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).", lower_bound=0)
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
  flags.DEFINE_integer("n_samples", 1, "Samples per prompt.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Param dtype.")
  flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                    "Compute dtype (default: --dtype).")
  flags.DEFINE_enum("attention", "xla", ["xla", "dot_product"], "Attention implementation.")


FLAGS = flags.FLAGS

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


def run(model_path, prompts, tokenizer_path=None, chat=False, system=None, max_new_tokens=64,
        temperature=0.0, top_k=0, top_p=1.0, n_samples=1, seed=0, dtype="float32",
        compute_dtype=None, attention="xla", base=None):
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
    model, params = ftjax.load_pretrained(base_path, dtype=dtype, compute_dtype=compute_dtype,
                                          attention=attention)
    model, params = ftjax.load_adapter(model, params, model_path)
    tokenizer = load_tokenizer(tokenizer_path or (
        model_path if _has_tokenizer(model_path) else ftjax.hf.resolve(base_path)))
  elif os.path.isdir(os.path.join(model_path, "checkpoints")):
    from ftjax import workdir as wd
    model, params, tokenizer, _ = wd.load_trained(model_path)
    if tokenizer_path:
      tokenizer = load_tokenizer(tokenizer_path)
  else:
    model, params = ftjax.load_pretrained(model_path, dtype=dtype, compute_dtype=compute_dtype,
                                          attention=attention)
    tokenizer = load_tokenizer(tokenizer_path or ftjax.hf.resolve(model_path))
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


def main(argv):
  del argv
  if not FLAGS.model or not FLAGS.prompt:
    raise app.UsageError("--model and at least one --prompt are required")
  texts = run(FLAGS.model, FLAGS.prompt, FLAGS.tokenizer, FLAGS.chat, FLAGS.system,
              FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.n_samples,
              FLAGS.seed, FLAGS.dtype, FLAGS.compute_dtype, FLAGS.attention, FLAGS.base)
  n = FLAGS.n_samples
  for i, text in enumerate(texts):
    print(f"--- prompt {i // n}" + (f" sample {i % n}" if n > 1 else ""))
    print(text)


if __name__ == "__main__":
  cli.run(main, define_flags)
