"""Tokenizer helpers: load an HF tokenizer, or train a small byte-level BPE one offline.

The trained tokenizer is what tests and the built-in demo use, since there is no hub here;
it is saved in the standard `tokenizer.json` + `tokenizer_config.json` layout, with a chat
template, so `transformers.AutoTokenizer.from_pretrained` reads it like any other.
"""

from __future__ import annotations

import os
from typing import Iterable

from ftjax.errors import UserError

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")

# Each turn is `<|role|>\n content <|end|>\n`; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str,
                        add_bos: bool = False):
  """Train a byte-level BPE tokenizer on `texts` and save it as an HF tokenizer in out_dir.

  Returns the `transformers.PreTrainedTokenizerFast`. Ids 0..5 are SPECIAL_TOKENS in order:
  pad=0, bos=1, eos=2 (`<|end|>`, which also closes every chat turn). `add_bos`: its
  post-processor puts BOS before every encoded text, as Llama's does, so `tokenizer(text)` (and
  with it ftjax's and TRL's plain-text rows and GRPO's string prompts) starts with BOS.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  # Digits one by one (as Llama 3 and Qwen do): numbers copy and compare token by token.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(texts), trainer=trainer)
  if add_bos:
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", 1)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                 eos_token="<|end|>", chat_template=CHAT_TEMPLATE)
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  return fast


# Files any of transformers' tokenizers is read from (one of them is enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def _check_json(path: str):
  import json
  try:
    with open(path) as f:
      json.load(f)
  except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
    raise UserError(f"{path}: invalid JSON ({e})") from None


# The class AutoTokenizer resolves a plain `tokenizer.json` tokenizer (ours, and many hub ones)
# to. Loading it by name skips AutoTokenizer's import of transformers' model configs, which
# pulls in torch: ~2 s of every CLI start on a CPU.
PLAIN_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _plain_fast_tokenizer(path: str, names: set) -> bool:
  import json
  if "tokenizer.json" not in names or "tokenizer_config.json" not in names:
    return False
  with open(os.path.join(path, "tokenizer_config.json")) as f:
    cfg = json.load(f)
  return cfg.get("tokenizer_class") in PLAIN_FAST_CLASSES and "auto_map" not in cfg


def load_tokenizer(path: str):
  """An HF tokenizer from a local directory (no remote code).

  A directory with no tokenizer files and a corrupt JSON file (config.json, tokenizer.json,
  tokenizer_config.json) are told apart: each is one line naming what is wrong."""
  if not os.path.isdir(path):
    raise UserError(f"{path}: no such tokenizer directory")
  names = set(os.listdir(path))
  if not names:
    raise UserError(f"{path}: the directory is empty (no config.json, no tokenizer files such "
                    f"as {', '.join(TOKENIZER_FILES[:3])})")
  for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
    if name in names:
      _check_json(os.path.join(path, name))
  if not names & set(TOKENIZER_FILES):
    raise UserError(f"{path}: has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                    "give a tokenizer directory (config.model.tokenizer, generate.py --tokenizer)")
  try:
    if _plain_fast_tokenizer(path, names):
      from transformers import PreTrainedTokenizerFast
      return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
  except (OSError, ValueError) as e:  # missing or unreadable tokenizer files
    msg = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    raise UserError(f"{path}: cannot load a tokenizer ({msg.strip()})") from None
