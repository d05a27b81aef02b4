"""experiments/generate.py from the command line on a tiny model with its own tokenizer."""

import os
import shutil
import subprocess
import sys

import numpy as np

import ftjax
from experiments import generate as gen_exp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_dir(hf_models, tiny_tokenizer_dir, tmp_path):
  d = str(tmp_path / "m")
  shutil.copytree(hf_models["llama"][0], d)
  for f in os.listdir(tiny_tokenizer_dir):
    shutil.copy(os.path.join(tiny_tokenizer_dir, f), d)
  return d


def test_run_matches_sampler(hf_models, tiny_tokenizer_dir, tmp_path):
  d = _model_dir(hf_models, tiny_tokenizer_dir, tmp_path)
  texts = gen_exp.run(d, ["Where is my order?", "hello"], chat=True, max_new_tokens=8)
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
  # The same tokens through the library directly.
  tok = ftjax.tokenizer.load_tokenizer(d)
  ids = gen_exp.encode_prompts(tok, ["Where is my order?"], chat=True)
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
