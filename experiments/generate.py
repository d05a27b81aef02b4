"""Sample from a Hugging Face model directory with ftjax's KV-cache sampler.

  python experiments/generate.py --model=/path/to/hf_dir --prompt="Where is my order?" \
      --chat --max_new_tokens=64 --temperature=0.7 --top_p=0.9

`--prompt` may be given several times (one batch, left-padded). `--chat` renders each prompt
as a user turn with the tokenizer's chat template (optionally after `--system`).

`--model` may also be a PEFT adapter directory (adapter_config.json + adapter_model.safetensors):
its base is `--base`, else the adapter config's `base_model_name_or_path`; the tokenizer is the
adapter directory's when it holds one, else the base's. The logic: ftjax/inference.py.

Several LoRA adapters over one base, served in one batch (ftjax/adapters.py):

  python experiments/generate.py --adapter returns=/path/workdir --adapter billing=/path/peft_dir \
      --requests=requests.jsonl --max_new_tokens=64

Each requests.jsonl row is {"prompt": "...", "adapter": "returns"} or {"messages": [...],
"adapter": "billing"}; a row without "adapter" (or null) runs on the base alone. `--adapter=DIR`
(no NAME=) reads PEFT's multi-adapter layout (a subfolder per adapter). The base is `--model`,
else the first adapter's (its adapter config's base_model_name_or_path, or the workdir's
model.hf_path).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

# This checkout's ftjax, whichever one pip installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli, inference  # noqa: E402


def define_flags():
  """Flags exist only when run as a script (cli.run), so that they never clash in a process
  that imports several of these scripts' packages."""
  flags.DEFINE_string("model", None, "HF model directory (config.json + safetensors), hub name, "
                      "or an ftjax training workdir.")
  flags.DEFINE_string("base", None, "Base model for a PEFT adapter --model (default: the "
                      "adapter config's base_model_name_or_path).")
  flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: --model).")
  flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat the flag for a batch.")
  flags.DEFINE_multi_string("adapter", None, "NAME=DIR: a LoRA adapter (ftjax workdir or PEFT "
                            "dir) served beside the others in one batch; or a DIR in PEFT's "
                            "multi-adapter layout. Needs --requests.")
  flags.DEFINE_string("requests", None, "JSON-lines requests for --adapter: {\"prompt\" or "
                      "\"messages\", \"adapter\": NAME or null} per line.")
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


def main(argv):
  del argv
  if FLAGS.adapter or FLAGS.requests:
    if not (FLAGS.adapter and FLAGS.requests) or FLAGS.prompt:
      raise app.UsageError("--adapter and --requests go together, without --prompt")
    texts = inference.generate_multi(
        FLAGS.adapter, FLAGS.requests, FLAGS.model or FLAGS.base, FLAGS.tokenizer, FLAGS.chat,
        FLAGS.system, FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p,
        FLAGS.n_samples, FLAGS.seed, FLAGS.dtype, FLAGS.compute_dtype, FLAGS.attention)
    _print(texts)
    return
  if not FLAGS.model or not FLAGS.prompt:
    raise app.UsageError("--model and at least one --prompt are required")
  texts = inference.generate_texts(
      FLAGS.model, FLAGS.prompt, FLAGS.tokenizer, FLAGS.chat, FLAGS.system, FLAGS.max_new_tokens,
      FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.n_samples, FLAGS.seed, FLAGS.dtype,
      FLAGS.compute_dtype, FLAGS.attention, FLAGS.base)
  _print(texts)


def _print(texts):
  n = FLAGS.n_samples
  for i, text in enumerate(texts):
    print(f"--- prompt {i // n}" + (f" sample {i % n}" if n > 1 else ""))
    print(text)


if __name__ == "__main__":
  cli.run(main, define_flags)
