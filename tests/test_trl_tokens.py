"""The same tokens as TRL: ftjax's SFT and DPO token ids and loss masks against TRL 1.16's own
dataset preparation (`SFTTrainer._prepare_dataset`, `DPOTrainer._prepare_dataset`, which hold its
tokenization) on the same rows, for GPT-2-, Llama-3- and Qwen2.5-style tokenizers built here
(byte-level BPE trained on a few sentences; their special tokens, post-processors and chat
templates are those of the real ones, the templates read from TRL's own chat_templates/).

What the three cover: GPT-2 has a `bos_token` (<|endoftext|>) that `tokenizer(text)` does not
add; Llama 3's post-processor adds <|begin_of_text|>; Qwen2.5 has no BOS at all. ftjax's default
(`add_bos` unset) puts before plain text what `tokenizer(text)` puts there, so all three match.

Documented exceptions (each asserted below, so a change in either library shows):
  1. Chat rows: ftjax ends a response at its end-of-turn token. TRL keeps what the template puts
     after it (Qwen's "\\n" after <|im_end|>) in the DPO response and in the SFT completion mask.
     ftjax's DPO sequences stop before it; its SFT sequences hold it (the template's own tokens)
     but not as a target. Llama 3's template puts nothing after <|eot_id|>: equal there.
  2. Plain text whose prompt/completion boundary falls inside a token (a prompt ending in a space
     before a word): TRL tokenizes prompt + completion jointly and starts the completion where
     the ids diverge, so its prompt loses the space token; ftjax tokenizes the two apart, and its
     prompt is `tokenizer(prompt)`, the context the model is given at inference.
  3. Not covered here: sentencepiece tokenizers that prepend "▁" to a text (Llama 2, Mistral),
     where the completion tokenized apart starts with that prefix; and a tokenizer whose post-
     processor appends EOS (TRL's row then ends with two).
"""

import os
import types

import pytest

from ftjax.data import formats
from tests.test_data_preference import TRL_LAYOUTS
from ftjax.data import preference as pref

CORPUS = [
    "Where is my order? It shipped on Monday.", "It shipped. It is on its way.",
    "No idea. I do not know where it is.", "The sky is blue today. It is warm.",
    "Question: where is it? Answer: It is here.", "Be brief. When? On Monday.",
    "Can I return the jacket? Yes, within 30 days.", "Hello there, how can I help you?",
] * 4


def _bpe(specials):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer=trainer)
  return tok


def _template(name):
  import trl
  with open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", name)) as f:
    return f.read()


def gpt2_style():
  from tokenizers import processors
  from transformers import PreTrainedTokenizerFast
  tok = _bpe(["<|endoftext|>"])
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  e = "<|endoftext|>"
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=e, eos_token=e, unk_token=e)


def llama3_style():
  from tokenizers import processors
  from transformers import PreTrainedTokenizerFast
  tok = _bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
              "<|eot_id|>"])
  bos = "<|begin_of_text|>"
  tok.post_processor = processors.Sequence([  # as Llama 3's tokenizer.json
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                    special_tokens=[(bos, tok.token_to_id(bos))])])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>",
                                 chat_template=_template("llama3.jinja"))


def qwen_style():
  from tokenizers import processors
  from transformers import PreTrainedTokenizerFast
  tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>",
                                 chat_template=_template("qwen2_5.jinja"))


STYLES = {"gpt2": gpt2_style, "llama3": llama3_style, "qwen2.5": qwen_style}
# What tokenizer(text) puts before the text, by the real tokenizers' behaviour.
ADDS_BOS = {"gpt2": False, "llama3": True, "qwen2.5": False}


@pytest.fixture(scope="module", params=list(STYLES))
def style(request):
  import datasets
  datasets.disable_progress_bars()
  return request.param, STYLES[request.param]()


# GPT-2 has no chat template: the chat rows are compared for the two styles that have one.
@pytest.fixture(scope="module", params=[n for n in STYLES if n != "gpt2"])
def chat_style(request):
  import datasets
  datasets.disable_progress_bars()
  return request.param, STYLES[request.param]()


def trl_sft(tok, rows, tmp_path):
  """TRL's SFT preparation of `rows`: [(input_ids, labels != -100)]."""
  from datasets import Dataset
  from trl import SFTConfig, SFTTrainer
  args = SFTConfig(output_dir=str(tmp_path), dataset_num_proc=None, report_to=[], use_cpu=True,
                   bf16=False)
  me = types.SimpleNamespace(_tokenizer=tok, chat_template=None, completion_only_loss=True)
  out = SFTTrainer._prepare_dataset(me, Dataset.from_list(rows), tok, args, False, None, "t")
  return [(list(r["input_ids"]), [lab != -100 for lab in r["labels"]]) for r in out]


def trl_dpo(tok, rows, tmp_path):
  """TRL's DPO preparation of `rows`: [{prompt_ids, chosen_ids, rejected_ids}]."""
  from datasets import Dataset
  from trl import DPOConfig, DPOTrainer
  args = DPOConfig(output_dir=str(tmp_path), dataset_num_proc=None, report_to=[], use_cpu=True,
                   bf16=False)
  me = types.SimpleNamespace(_tokenizer=tok)
  return list(DPOTrainer._prepare_dataset(me, Dataset.from_list(rows), tok, args, "t"))


def after_end_of_turn(tok, ids):
  """TRL's response tokens after the end-of-turn token: whitespace only (the exception 1)."""
  assert tok.decode(ids).strip() == "", tok.decode(ids)
  return len(ids)


# --- SFT -----------------------------------------------------------------------------------------

def test_sft_plain_text_as_trl(style, tmp_path):
  name, tok = style
  text = [{"text": "The sky is blue today."}, {"text": "It shipped on Monday."}]
  pc = [{"prompt": "Where is my order?", "completion": " It shipped on Monday."},
        {"prompt": "Question: where is it?", "completion": "\nIt is here."}]
  for rows, fmt in ((text, "text"), (pc, "prompt_completion")):
    for row, (ids, mask) in zip(rows, trl_sft(tok, rows, tmp_path)):
      ex = formats.tokenize_example(row, tok, fmt)
      assert list(ex["tokens"]) == ids, (name, row)
      assert list(ex["loss_mask"]) == mask, (name, row)
      assert (ids[0] == tok.bos_token_id) == ADDS_BOS[name]


def test_sft_chat_as_trl(chat_style, tmp_path):
  name, tok = chat_style
  assert tok.chat_template is not None
  # A whole conversation (TRL's language-modelling rows, every token a target).
  msgs = [{"role": "user", "content": "Where is my order?"},
          {"role": "assistant", "content": "It shipped."},
          {"role": "user", "content": "When?"}, {"role": "assistant", "content": "On Monday."}]
  ((ids, mask),) = trl_sft(tok, [{"messages": msgs}], tmp_path)
  ex = formats.tokenize_example({"messages": msgs}, tok, "chat", loss_on_prompt=True)
  assert list(ex["tokens"]) == ids and all(mask) and ex["loss_mask"].all()
  # Conversational prompt-completion: the completion turn is the target.
  row = {"prompt": [msgs[0]], "completion": [msgs[1]]}
  ((ids, mask),) = trl_sft(tok, [row], tmp_path)
  ex = formats.tokenize_example({"prompt": msgs[0]["content"], "completion": msgs[1]["content"]},
                                tok, "prompt_completion", chat_template=True)
  assert list(ex["tokens"]) == ids, name  # the template's own tokens, BOS included
  ours = list(ex["loss_mask"])
  end = len(ours) - ours[::-1].index(True)  # ftjax's targets end at the end-of-turn token
  assert ids[end - 1] == tok.eos_token_id
  assert ours[:end] == mask[:end]
  assert after_end_of_turn(tok, ids[end:]) == (1 if name == "qwen2.5" else 0)
  assert all(mask[end:]) and not any(ours[end:])  # exception 1


# --- DPO -----------------------------------------------------------------------------------------

# TRL's four preference layouts, as tests/test_data_preference.py writes them.
DPO_ROWS = TRL_LAYOUTS


def test_dpo_as_trl(style, tmp_path):
  name, tok = style
  for layout, row in DPO_ROWS.items():
    chat = layout.startswith("conversational")
    if chat and tok.chat_template is None:
      continue
    (want,) = trl_dpo(tok, [row], tmp_path)
    ex = pref.tokenize_preference(row, tok, "auto")
    p = ex["prompt_len"]
    assert list(ex["chosen"][:p]) == want["prompt_ids"], (name, layout)
    assert (want["prompt_ids"][0] == tok.bos_token_id) == (ADDS_BOS[name] or chat and
                                                           name == "llama3")
    for side in ("chosen", "rejected"):
      ours, theirs = list(ex[side][p:]), want[f"{side}_ids"]
      assert ex[f"{side}_mask"][p:].all() and not ex[f"{side}_mask"][:p].any()
      assert ours == theirs[:len(ours)] and ours[-1] == tok.eos_token_id, (name, layout, side)
      extra = after_end_of_turn(tok, theirs[len(ours):])  # exception 1
      assert extra == (1 if chat and name == "qwen2.5" else 0), (name, layout, side)
    # The sampling prompt is the pair's prompt.
    assert list(pref.tokenize_prompt(row, tok, "auto")) == want["prompt_ids"]


def test_boundary_inside_a_token_is_the_documented_exception(style, tmp_path):
  """Exception 2: the prompt ends in a space that joins the next word in joint tokenization."""
  name, tok = style
  row = {"prompt": "Where is my order? ", "chosen": "It shipped on Monday.",
         "rejected": "No idea."}
  (want,) = trl_dpo(tok, [row], tmp_path)
  ex = pref.tokenize_preference(row, tok, "pairs")
  p = ex["prompt_len"]
  assert list(ex["chosen"][:p]) == tok(row["prompt"])["input_ids"]  # the inference context
  assert list(ex["chosen"][:p]) != want["prompt_ids"]
  assert list(ex["chosen"][:len(want["prompt_ids"])]) == want["prompt_ids"]  # TRL's is shorter
  for side in ("chosen", "rejected"):  # the same text either way
    assert (tok.decode(ex[side]) ==
            tok.decode(want["prompt_ids"] + want[f"{side}_ids"])), (name, side)


def test_add_bos_overrides_the_tokenizer(style):
  name, tok = style
  row = {"prompt": "Where is my order?", "completion": " It shipped."}
  ex = {v: formats.tokenize_example(row, tok, "prompt_completion", add_bos=v)["tokens"]
        for v in (None, True, False)}
  assert list(ex[False]) == tok("Where is my order?", add_special_tokens=False)["input_ids"] + \
      tok(" It shipped.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
  if tok.bos_token_id is None:
    assert list(ex[True]) == list(ex[False])
  else:
    assert list(ex[True]) == [tok.bos_token_id] + list(ex[False])
  assert list(ex[None]) == list(ex[True] if ADDS_BOS[name] else ex[False])
  pair = pref.tokenize_preference({**row, "chosen": " Yes.", "rejected": " No."}, tok, "pairs",
                                  add_bos=True)
  assert (pair["chosen"][0] == tok.bos_token_id) == (tok.bos_token_id is not None)
