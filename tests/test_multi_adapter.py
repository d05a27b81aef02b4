"""Several LoRA adapters over one base in one batch (ftjax/adapters.py): every row equals its
adapter run alone (ftjax's single-adapter path and PEFT's own model), logits and greedy
tokens, for LoRA, rsLoRA and DoRA over float32 and NF4 bases; PEFT's multi-adapter layout
both ways; ftjax workdirs beside PEFT dirs; the bad inputs as one line."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import ftjax
from ftjax import adapters, inference, sampling
from ftjax.errors import UserError
from tests.conftest import batch_with_padding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> peft.LoraConfig kwargs: one of each kind, with different ranks and targets.
KINDS = {"lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
         "rslora": dict(r=2, lora_alpha=6, target_modules="all-linear", use_rslora=True),
         "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)}


def _peft_model(path, seed, **kw):
  torch.manual_seed(seed)
  base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  return peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **kw)).eval()


def _torch_logits(model, tokens, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()


def _logits(model, params, tokens, mask, rows=None):
  fn = jax.jit(lambda p, t, m, r: model.apply({"params": p}, t, mask=m, adapter_rows=r))
  return np.asarray(fn(params, tokens, mask, rows))


@pytest.fixture(scope="module")
def peft_adapters(hf_models, tmp_path_factory):
  """name -> a PEFT adapter directory made by PEFT itself (random A and B) on the tiny llama."""
  out = {}
  for i, (name, kw) in enumerate(KINDS.items()):
    d = str(tmp_path_factory.mktemp(name))
    _peft_model(hf_models["llama"][0], i, **kw).save_pretrained(d)
    out[name] = d
  return out


def _batch():
  """Four rows: one per adapter of KINDS and one without (the first prompt again)."""
  tokens, mask = batch_with_padding(np.random.default_rng(0), side="left")
  return np.concatenate([tokens, tokens[:1]]), np.concatenate([mask, mask[:1]])


def _merged_torch(model, params, out_dir):
  """transformers' model of ftjax's merged export (a 4-bit base dequantized, the adapter
  folded in): the reference where PEFT has no NF4 on this CPU."""
  ftjax.save_pretrained(model, params, out_dir)
  return transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()


def _torch_greedy(model, tokens, n):
  """PEFT's own greedy continuation of one unpadded prompt."""
  with torch.no_grad():
    out = model.generate(torch.tensor(tokens[None], dtype=torch.long), max_new_tokens=n,
                         do_sample=False, pad_token_id=0)
  return out[0, len(tokens):].numpy()


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_mixed_batch_equals_each_adapter_alone(hf_models, peft_adapters, quant, tmp_path):
  """Logits: each row vs its adapter alone in ftjax (1e-5) and, fp32, in PEFT (1e-4). Greedy
  tokens: vs PEFT's generate (fp32), or transformers' on the merged NF4 model."""
  path = hf_models["llama"][0]
  base_model, base = ftjax.load_pretrained(path, quant=quant)
  model, params = ftjax.load_adapters(base_model, base, peft_adapters)
  # The base is shared, not copied.
  strip = lambda tree: jax.tree_util.tree_leaves(ftjax.lora.base_params(tree))
  assert all(a is b for a, b in zip(strip(params), strip(base), strict=True))
  names = list(KINDS) + [None]
  rows = adapters.adapter_rows(model, names)
  np.testing.assert_array_equal(rows, [0, 1, 2, -1])
  tokens, mask = _batch()
  mixed = _logits(model, params, tokens, mask, rows)
  out = np.asarray(sampling.generate(model, params, tokens, mask, max_new_tokens=6,
                                     adapter_rows=rows).tokens)
  # No adapter: the base, bitwise, given the same batch (XLA's CPU kernels may round a batch of
  # one differently from a batch of four, as they do on AMD EPYC).
  base_ref = _logits(base_model, base, tokens, mask)[3]
  np.testing.assert_array_equal(mixed[3][mask[3]], base_ref[mask[3]])
  for i, name in enumerate(KINDS):
    one = ftjax.load_adapter(base_model, base, peft_adapters[name])
    ref = _logits(*one, tokens[i:i + 1], mask[i:i + 1])[0]
    np.testing.assert_allclose(mixed[i][mask[i]], ref[mask[i]], atol=1e-5, rtol=0)
    assert np.abs(ref - base_ref)[mask[i]].max() > 1e-1  # the adapter changes the model
    if quant is None:  # PEFT itself
      pm = _peft_model(path, i, **KINDS[name])
      torch_ref = _torch_logits(pm, tokens[i:i + 1], mask[i:i + 1])[0]
      assert np.abs(mixed[i] - torch_ref)[mask[i]].max() <= 1e-4
      greedy = _torch_greedy(pm, tokens[i][mask[i]], 6)
    else:
      merged = _merged_torch(*one, str(tmp_path / name))
      greedy = _torch_greedy(merged, tokens[i][mask[i]], 6)
    np.testing.assert_array_equal(out[i], greedy, err_msg=name)
  assert len({tuple(t) for t in out}) > 1


def test_peft_multi_adapter_layout_round_trips(hf_models, peft_adapters, tmp_path):
  path = hf_models["llama"][0]
  tokens, mask = _batch()
  # PEFT writes two adapters: "default" at the top, "billing" in a subfolder.
  pm = _peft_model(path, 0, **KINDS["lora"])
  pm.add_adapter("billing", peft.LoraConfig(init_lora_weights=False, **KINDS["dora"]))
  written = str(tmp_path / "by_peft")
  pm.save_pretrained(written)
  assert os.path.isfile(os.path.join(written, "billing", "adapter_config.json"))
  base_model, base = ftjax.load_pretrained(path)
  model, params = ftjax.load_adapters(base_model, base, written)
  assert model.spec.multi.names == ("default", "billing")
  ours = _logits(model, params, tokens, mask, adapters.adapter_rows(model, ["default", "billing",
                                                                           None, "billing"]))
  for i, name in enumerate(["default", "billing", None, "billing"]):
    pm.set_adapter(name or "default")
    if name is None:
      with pm.disable_adapter():
        ref = _torch_logits(pm, tokens[i:i + 1], mask[i:i + 1])[0]
    else:
      ref = _torch_logits(pm, tokens[i:i + 1], mask[i:i + 1])[0]
    assert np.abs(ours[i] - ref)[mask[i]].max() <= 1e-4, name
  # ftjax writes its three adapters (ranks 4, 2, 4), PEFT's load_adapter reads each back.
  model, params = ftjax.load_adapters(base_model, base, peft_adapters)
  out = str(tmp_path / "by_ftjax")
  ftjax.save_adapters(model, params, out, base_model_name_or_path=path)
  assert sorted(os.listdir(out)) >= sorted(KINDS)
  assert json.load(open(os.path.join(out, "rslora", "adapter_config.json")))["r"] == 2
  hf_base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  back = peft.PeftModel.from_pretrained(hf_base, os.path.join(out, "lora"), adapter_name="lora")
  for name in ("rslora", "dora"):
    back.load_adapter(os.path.join(out, name), adapter_name=name)
  rows = adapters.adapter_rows(model, list(KINDS) + [None])
  ours = _logits(model, params, tokens, mask, rows)
  for i, name in enumerate(KINDS):
    back.set_adapter(name)
    ref = _torch_logits(back.eval(), tokens[i:i + 1], mask[i:i + 1])[0]
    assert np.abs(ours[i] - ref)[mask[i]].max() <= 1e-4, name


def test_workdir_beside_peft_dir_and_bad_inputs(base_dir, chat_files, hf_models, peft_adapters,
                                               tmp_path):
  from ftjax import workdir as wd
  from ftjax.train import sft
  from tests.test_sft import make_config
  train, ev = chat_files
  run = str(tmp_path / "run")
  config = make_config(base_dir, train, ev, steps=2, eval_every=2, save_every=2)
  config.data.eval_path = ""  # no eval step to compile
  config.adapter.update(rslora=True, dropout=0.0)
  config.optim.lr = 5e-2  # two steps that move B well away from zero
  sft.run(config, run)
  requests = str(tmp_path / "requests.jsonl")
  reqs = [{"messages": [{"role": "user", "content": "Where is my order?"}], "adapter": "trained"},
          {"messages": [{"role": "user", "content": "I want a refund"}], "adapter": "peft"},
          {"prompt": "Where is my order?"}]
  with open(requests, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in reqs)
  flags = [f"trained={run}", f"peft={peft_adapters['lora']}"]
  texts = inference.generate_multi(flags, requests, base=base_dir, max_new_tokens=6)
  assert len(texts) == 3
  # Each row alone in transformers: the workdir's model merged, the PEFT dir in PEFT.
  from ftjax import rollout
  tok = ftjax.tokenizer.load_tokenizer(base_dir)
  m1, p1, _, _ = wd.load_trained(run)
  ids = inference.encode_prompts(tok, ["Where is my order?", "I want a refund"], chat=True)
  eos = set(rollout.eos_ids(tok, m1))

  def text(torch_model, prompt):
    want = _torch_greedy(torch_model, np.asarray(prompt), 6)
    cut = next((j + 1 for j, t in enumerate(want) if int(t) in eos), len(want))
    return tok.decode(want[:cut], skip_special_tokens=True)
  assert texts[0] == text(_merged_torch(m1, p1, str(tmp_path / "merged")), ids[0])
  # the peft_adapters["lora"] directory on base_dir, in PEFT
  peft_on_base = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(base_dir), peft_adapters["lora"]).eval()
  assert texts[1] == text(peft_on_base, ids[1])
  assert texts[0] != texts[2] or texts[1] != texts[2]
  # An adapter of another base (qwen3's q_proj is 32 -> 64): one line naming it.
  qwen = str(tmp_path / "qwen")
  _peft_model(hf_models["qwen3"][0], 0, r=2, target_modules=["q_proj"]).save_pretrained(qwen)
  with pytest.raises(UserError, match=r"adapter 'other' .*shape") as e:
    inference.generate_multi(flags + [f"other={qwen}"], requests, base=base_dir)
  assert "\n" not in str(e.value)
  # A request naming an unknown adapter, through the CLI: one line, exit 1, before any load.
  with open(requests, "a") as f:
    f.write(json.dumps({"prompt": "hi", "adapter": "nosuch"}) + "\n")
  res = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "generate.py"),
                        f"--model={base_dir}", f"--adapter=trained={run}",
                        f"--adapter=peft={peft_adapters['lora']}", f"--requests={requests}"],
                       capture_output=True, text=True, timeout=300)
  assert res.returncode != 0 and not res.stdout
  last = res.stderr.strip().splitlines()
  assert len(last) == 1 and f"{requests}:4" in last[0] and "'nosuch'" in last[0], res.stderr

