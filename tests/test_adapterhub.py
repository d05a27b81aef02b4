"""Bottleneck adapters in the `adapters` library's layout (AdapterHub, ftjax/adapterhub.py).

adapters 1.3.0 (the latest) pins transformers ~=4.57.6; ftjax runs on transformers 5, so the
library cannot be imported here. Its check runs in a python that has it (FTJAX_ADAPTERS_PYTHON,
default /work/venvs/ahub/bin/python; BUILD.md says how to make one): tests/adapterhub_check.py
loads every export with `load_adapter` and compares its logits to ftjax's. The layout, the
config mapping and the refusals are checked here without it.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from configs import sft as sft_config
from ftjax import adapterhub, export, hf, model as model_lib, st_io
from ftjax import workdir as wd
from ftjax.config import BottleneckConfig
from ftjax.errors import UserError
from ftjax.train import sft

HERE = os.path.dirname(os.path.abspath(__file__))
ADAPTERS_PYTHON = os.environ.get("FTJAX_ADAPTERS_PYTHON", "/work/venvs/ahub/bin/python")
ATOL = 1e-4


@pytest.fixture(scope="module")
def trained(base_dir, chat_files, tmp_path_factory):
  """A 2-step houlsby run on the tiny llama, exported with --format=adapterhub."""
  root = tmp_path_factory.mktemp("ahub")
  c = sft_config.get_config("adapter=bottleneck,smoke")
  c.model.hf_path = base_dir
  c.data.path, c.data.eval_path = chat_files[0], ""
  c.adapter.update(reduction_factor=4, placement="houlsby")
  c.optim.update(lr=3e-2, schedule="constant")
  c.train.update(steps=2, seq_len=128, batch_size=4, save_every=2, log_every=1,
                 async_save=False)
  work = str(root / "bn_run")
  sft.run(c, work)
  out = export.export(work, str(root / "bn_ahub"), "adapterhub")
  model, params, _, _ = wd.load_trained(work)
  return work, out, model, params




def test_layout(trained, base_dir):
  work, out, model, params = trained
  files = set(os.listdir(out))
  assert {"adapter_config.json", "adapter.safetensors", "pytorch_adapter.bin", "README.md",
          hf.EXPORT_MARKER, "tokenizer.json"} <= files
  with open(os.path.join(out, "adapter_config.json")) as f:
    cfg = json.load(f)
  assert cfg["name"] == "bn_run" and cfg["model_type"] == "llama"
  assert cfg["hidden_size"] == model.cfg.d_model and cfg["model_class"] == "LlamaForCausalLM"
  assert cfg["config"]["mh_adapter"] and cfg["config"]["output_adapter"]
  assert cfg["config"]["reduction_factor"] == 4 and cfg["version"] == "adapters.1.3.0"
  # Every weight sits in a decoder layer transformers' model has, in torch's [out, in] layout,
  # and the .bin (what load_adapter reads by default) holds the same tensors.
  torch_mods = dict(transformers.AutoModelForCausalLM.from_pretrained(base_dir).named_modules())
  st = st_io.SafetensorsFile(os.path.join(out, "adapter.safetensors"))
  names = sorted(st.names())
  binary = torch.load(os.path.join(out, "pytorch_adapter.bin"), weights_only=True)
  assert sorted(binary) == names and len(names) == model.cfg.n_layers * 2 * 4
  flat = traverse_util.flatten_dict(params)
  r = model.cfg.d_model // 4
  for name in names:
    layer, rest = name.split(".attention_adapters." if "attention" in name
                             else ".output_adapters.")
    assert isinstance(torch_mods[layer], transformers.models.llama.modeling_llama
                      .LlamaDecoderLayer)
    assert rest.startswith("adapters.bn_run.adapter_")
    arr = st.get(name)
    np.testing.assert_array_equal(arr, binary[name].numpy())
    site = "attn_adapter" if "attention" in name else "mlp_adapter"
    leaf = {"adapter_down.0.weight": "down", "adapter_down.0.bias": "down_bias",
            "adapter_up.weight": "up", "adapter_up.bias": "up_bias"}[rest.split(".", 2)[2]]
    want = np.asarray(flat[("layers", site, leaf)])[int(layer.rsplit(".", 1)[1])]
    np.testing.assert_array_equal(arr, want.T if want.ndim == 2 else want)
    assert arr.shape[0] in (r, model.cfg.d_model)
  assert np.abs(np.asarray(flat[("layers", "mlp_adapter", "up")])).max() > 0  # trained
  from huggingface_hub import ModelCard
  card = ModelCard.load(os.path.join(out, "README.md"))
  assert card.data.library_name == "adapter-transformers"


@pytest.mark.parametrize("placement,activation", [("houlsby", "relu"), ("pfeiffer", "silu"),
                                                  ("pfeiffer", "gelu_tanh"),
                                                  ("houlsby", "gelu")])
def test_config_maps(placement, activation):
  """Placement -> adapters' mh_adapter (after attention) / output_adapter (after the MLP); our
  activation -> the transformers activation adapters builds from `non_linearity`."""
  c = adapterhub.bn_config(BottleneckConfig(8, placement, activation))
  assert (c["mh_adapter"], c["output_adapter"]) == (placement == "houlsby", True)
  assert c["reduction_factor"] == 8 and c["scaling"] == 1.0 and c["dropout"] == 0.0
  # adapter input = the sublayer output h (not x + h), adapter residual h, then + x
  assert not c["original_ln_before"] and c["original_ln_after"] and c["residual_before_ln"]
  assert not (c["ln_before"] or c["ln_after"] or c["use_gating"] or c["is_parallel"]
              or c["phm_layer"])
  x = np.linspace(-4, 4, 101, dtype=np.float32)
  theirs = transformers.activations.get_activation(c["non_linearity"])(torch.tensor(x)).numpy()
  np.testing.assert_allclose(np.asarray(model_lib._act(activation)(jnp.asarray(x))), theirs,
                             atol=1e-6)


def test_refusals(trained, hf_models, tmp_path):
  work = trained[0]
  config = wd.load_config(work)
  def refused(match, **change):
    c = wd.load_config(work)
    for key, value in change.items():
      section, k = key.split("__")
      c[section][k] = value
    with pytest.raises(UserError, match=match) as e:
      export._check_adapterhub(work, c)
    assert "\n" not in str(e.value) and "--format=adapterhub" in str(e.value)
  refused("model_type 'gemma'", model__hf_path=hf_models["gemma"][0])
  refused("model.head=score", model__head="score")
  refused("adapter.train_extra", adapter__train_extra="norm")
  refused("hf_path is empty", model__hf_path="")
  refused("bottleneck adapters only .*--format=peft", adapter__kind="lora")
  export._check_adapterhub(work, config)  # the run itself passes
  # merged and PEFT exports of a bottleneck run point at this format, in one line
  with pytest.raises(UserError, match="cannot be merged.*--format=adapterhub"):
    export.export(work, str(tmp_path / "merged"), "merged")
  assert not (tmp_path / "merged").exists()


def test_adapters_library_loads_it(trained, base_dir, hf_models, tmp_path):
  """adapters' `load_adapter` + `set_active_adapters` give ftjax's logits (fp32, 1e-4): the
  trained llama run (houlsby), and random adapters on qwen2 (houlsby; adapters' plugin
  interface, hooked on o_proj / down_proj) and gpt2 (pfeiffer; its patched block). The base
  alone is checked against transformers 5's logits, so a base that transformers 4.57 reads
  differently fails as such."""
  if not os.path.exists(ADAPTERS_PYTHON):
    pytest.skip("no python with the adapters library: adapters 1.3.0 needs transformers "
                f"~=4.57.6, ftjax runs on transformers {transformers.__version__}; set "
                "FTJAX_ADAPTERS_PYTHON (BUILD.md: Adapters)")
  tokens = np.random.default_rng(0).integers(0, 320, (2, 24))
  cases = []
  work, out, model, params = trained
  jobs = [("llama_trained", base_dir, model, params, out, "llama")]
  for fam, placement, act in (("qwen2", "houlsby", "gelu_tanh"), ("gpt2", "pfeiffer", "silu")):
    bc = BottleneckConfig(reduction_factor=8, placement=placement, activation=act)
    m, p = hf.load_pretrained(hf_models[fam][0], bottleneck=bc, scan_layers=fam != "gpt2")
    flat = traverse_util.flatten_dict(p)
    rng = np.random.default_rng(1)
    for k in flat:
      if any(s.endswith("_adapter") for s in k):
        flat[k] = jnp.asarray(rng.normal(0, 0.3, flat[k].shape), jnp.float32)
    p = traverse_util.unflatten_dict(flat)
    d = str(tmp_path / f"{fam}_{placement}")
    adapterhub.save(m, p, d, f"{fam}_{placement}")
    jobs.append((f"{fam}_{placement}_{act}", hf_models[fam][0], m, p, d, fam))
  for name, base, m, p, d, fam in jobs:
    adapted = np.asarray(m.apply({"params": p}, tokens), np.float32)
    with torch.no_grad():
      plain = hf_models[fam][1](torch.tensor(tokens)).logits.numpy()
    npz = str(tmp_path / f"{name}.npz")
    np.savez(npz, tokens=tokens, adapted=adapted, base=plain)
    cases.append({"name": name, "base": base, "adapter": d, "npz": npz, "atol": ATOL})
  with open(tmp_path / "cases.json", "w") as f:
    json.dump(cases, f)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  res = subprocess.run([ADAPTERS_PYTHON, os.path.join(HERE, "adapterhub_check.py"),
                        str(tmp_path / "cases.json")], capture_output=True, text=True,
                       timeout=300, env=env)
  lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
  assert res.returncode == 0 and len(lines) == len(cases), (res.stdout, res.stderr[-3000:])
  assert all(r["adapters"] == "1.3.0" for r in lines), lines
  print("\n".join(json.dumps(r) for r in lines), file=sys.stderr)
