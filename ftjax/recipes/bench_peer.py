"""The peer of the step benches (bench.py): the same workload in transformers + PEFT.

`bench.py --peer=hf` calls `peer_step` beside each `lora_step`, `qlora_step` and `full_step`
record: a transformers model of the same shape (`hf.config_to_hf` of the preset), random
weights, the same LoRA targets, rank and alpha (PEFT), AdamW over the trainable params,
gradient checkpointing when `--remat`, SDPA attention, the same batch of random tokens, and
bitsandbytes NF4 (`BitsAndBytesConfig`, CUDA only) for qlora_step. Timed like ftjax's steps:
the first call apart, then the median of `steps` calls, each ended by a device sync.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Optional

from ftjax import hf
from ftjax.config import ModelConfig

# PEFT target module names of "all-linear" per family (the output head excluded, as ftjax).
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"]}


def available() -> Optional[str]:
  """None when torch, transformers and peft import; else why the peer cannot run."""
  try:
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    return f"peer=hf needs torch, transformers and peft ({e})"
  return None


def _build(cfg: ModelConfig, bench: str, dtype, device: str):
  import torch
  import transformers as T
  conf = T.AutoConfig.for_model(**{k: v for k, v in hf.config_to_hf(cfg).items()
                                   if k not in ("torch_dtype", "dtype", "architectures")})
  conf._attn_implementation = "sdpa"
  torch.manual_seed(0)
  if bench != "qlora_step":
    with torch.device(device):
      return T.AutoModelForCausalLM.from_config(conf).to(dtype)
  with tempfile.TemporaryDirectory() as tmp:  # BitsAndBytesConfig quantizes while loading
    T.AutoModelForCausalLM.from_config(conf).to(dtype).save_pretrained(tmp)
    q = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return T.AutoModelForCausalLM.from_pretrained(tmp, quantization_config=q, dtype=dtype,
                                                  device_map={"": 0})


def peer_step(cfg: ModelConfig, bench: str, batch: int, seq_len: int, steps: int, warmup: int,
              rank: int, remat: bool, seed: int) -> dict:
  """One record: tokens/s, median step seconds and (CUDA) peak memory of the HF + PEFT step."""
  import peft
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if bench == "qlora_step" and device != "cuda":
    return {"peer": "hf-peft", "peer_skipped": "bitsandbytes NF4 training needs CUDA"}
  dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
  model = _build(cfg, bench, dtype, device)
  if remat:
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
  if bench != "full_step":
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
        target_modules=TARGETS.get(cfg.family, _LLAMA_LIKE)))
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
  gen = torch.Generator().manual_seed(seed)
  x = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen).to(device)

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  def step():
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return loss

  t0 = time.perf_counter()
  step()
  first_s = time.perf_counter() - t0
  for _ in range(max(warmup, 1) - 1):
    step()
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  rec = {"peer": "hf-peft", "peer_device": device, "peer_first_step_s": first_s,
         "peer_median_s": med, "peer_tokens_per_s": batch * seq_len / med}
  if device == "cuda":
    rec["peer_peak_bytes"] = int(torch.cuda.max_memory_allocated())
  return rec
