"""experiments/generate.py (ftjax/inference.py) from the command line and in-process, on a tiny
model with its own tokenizer."""

import os
import shutil
import subprocess
import sys

import numpy as np

import ftjax
from ftjax import inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_dir(hf_models, tiny_tokenizer_dir, tmp_path):
  d = str(tmp_path / "m")
  shutil.copytree(hf_models["llama"][0], d)
  for f in os.listdir(tiny_tokenizer_dir):
    shutil.copy(os.path.join(tiny_tokenizer_dir, f), d)
  return d


def test_run_matches_sampler(hf_models, tiny_tokenizer_dir, tmp_path):
  d = _model_dir(hf_models, tiny_tokenizer_dir, tmp_path)
  texts = inference.generate_texts(d, ["Where is my order?", "hello"], chat=True, max_new_tokens=8)
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
  # The same tokens through the library directly.
  tok = ftjax.tokenizer.load_tokenizer(d)
  ids = inference.encode_prompts(tok, ["Where is my order?"], chat=True)
  assert ids[0][0] == tok.bos_token_id and tok.convert_tokens_to_ids("<|assistant|>") in ids[0]
  model, params = ftjax.load_pretrained(d)
  out = ftjax.generate(model, params, np.array(ids), max_new_tokens=8, eos_id=tok.eos_token_id,
                       pad_id=tok.pad_token_id)
  keep = np.asarray(out.mask)[0]
  assert tok.decode(np.asarray(out.tokens)[0][keep], skip_special_tokens=True) == texts[0]


def test_cli(hf_models, tiny_tokenizer_dir, tmp_path):
  d = _model_dir(hf_models, tiny_tokenizer_dir, tmp_path)
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "generate.py"), f"--model={d}",
         "--prompt=Where is my order?", "--prompt=I want a refund", "--max_new_tokens=6",
         "--temperature=0.8", "--top_p=0.9", "--n_samples=2"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  assert res.stdout.count("--- prompt") == 4


def test_cli_bad_model_dir(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "generate.py"),
         f"--model={tmp_path}", "--prompt=hi"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert res.returncode != 0
  assert "config.json" in res.stderr.strip().splitlines()[-1]


def test_peft_adapter_dir(hf_models, tiny_tokenizer_dir, tmp_path):
  """A PEFT adapter directory saved by real PEFT: its base comes from adapter_config.json (or
  --base), and greedy tokens equal those of peft's model."""
  import json
  import peft
  import torch
  import transformers
  d = _model_dir(hf_models, tiny_tokenizer_dir, tmp_path)
  base = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
  pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                         init_lora_weights=False)
  torch.manual_seed(0)
  pm = peft.get_peft_model(base, pcfg).eval()
  with torch.no_grad():  # large enough that the adapter changes what greedy decoding picks
    for name, p in pm.named_parameters():
      if "lora_B" in name:
        p.mul_(50.0)
  out = str(tmp_path / "adapter")
  pm.save_pretrained(out)
  assert json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"] == d
  tok = ftjax.tokenizer.load_tokenizer(d)
  prompt = "Where is my order?"
  ids = torch.tensor([tok(prompt)["input_ids"]])
  with torch.no_grad():
    ref = pm.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None,
                      pad_token_id=tok.pad_token_id, min_new_tokens=6)[0, ids.shape[1]:]
    with pm.disable_adapter():  # get_peft_model wrapped `base` in place
      plain = pm.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=tok.pad_token_id, min_new_tokens=6)[0, ids.shape[1]:]
  assert not torch.equal(ref, plain)
  want = tok.decode(ref, skip_special_tokens=True)
  # eos off on both sides: compare all six tokens.
  model, params = ftjax.load_pretrained(d)
  model, params = ftjax.load_adapter(model, params, out)
  got = ftjax.generate(model, params, np.array([tok(prompt)["input_ids"]]), max_new_tokens=6)
  assert np.asarray(got.tokens)[0].tolist() == ref.tolist()
  assert inference.generate_texts(out, [prompt], max_new_tokens=6)[0] == want
  moved = str(tmp_path / "moved_base")
  shutil.copytree(d, moved)
  cfg = json.load(open(os.path.join(out, "adapter_config.json")))
  cfg["base_model_name_or_path"] = ""
  json.dump(cfg, open(os.path.join(out, "adapter_config.json"), "w"))
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "generate.py"), f"--model={out}",
         "--prompt=hi"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert res.returncode != 0 and "--base" in res.stderr.strip().splitlines()[-1]
  res = subprocess.run(cmd + [f"--base={moved}", "--max_new_tokens=2"], capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 0, res.stderr
