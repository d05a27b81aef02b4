"""Supervised fine-tuning (and continued pretraining) config.

  python experiments/sft.py --config=configs/sft.py:adapter=lora --workdir=/tmp/sft \
      --config.model.hf_path=/path/to/hf_dir --config.data.path=train.jsonl

The arg is a comma list of `key=value` or flags:
  model=PRESET      a preset from ftjax.config.PRESETS (used when model.hf_path is empty)
  adapter=KIND      none | lora | dora | prefix | prompt
  quant=KIND        none | nf4 | int4 (frozen base in 4 bits; needs an adapter)
  format=FMT        chat | alpaca | prompt_completion | text
  smoke             shrink everything so the config runs in CI in seconds
Print the resolved config (arg and --config.* overrides applied) with --print_config.
"""

import ml_collections

from ftjax.errors import UserError

ARG_KEYS = ("model", "adapter", "quant", "format", "smoke")


def parse_arg(arg, known=ARG_KEYS, where="configs/sft.py"):
  """`"a=1,smoke"` -> {"a": "1", "smoke": True}; an unknown key is a UserError listing `known`."""
  out = {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    k, _, v = part.partition("=")
    if k not in known:
      raise UserError(f"{where}: unknown arg key {k!r} in {arg!r}; known keys: "
                      f"{', '.join(known)}")
    out[k] = v if v else True
  return out


def get_config(arg=None):
  a = parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.model = dict(hf_path="", preset=a.get("model", "tiny"), tokenizer="", dtype="float32",
                 compute_dtype="", attention="xla", remat="none", seed=0, head="lm",
                 matmul_precision="auto")  # auto: full float32 dots when computing in float32
  kind = a.get("adapter", "lora")
  c.adapter = dict(kind="lora" if kind == "dora" else kind, rank=8, alpha=16.0, dropout=0.0,
                   targets="all-linear", rslora=False, dora=kind == "dora", init="kaiming",
                   length=16, reparam=False, reparam_hidden=512, train_extra="",
                   dtype="float32")  # trainable adapter params, whatever model.dtype is
  c.quant = dict(kind=a.get("quant", "none"), block_size=64, double_quant=True)
  # Prompt tuning prepends soft tokens to each row, so it takes one example per row.
  c.data = dict(path="", sources=[], format=a.get("format", "chat"), fields={},
                packing=kind != "prompt",
                overflow="truncate", skip_malformed=False, loss_on_prompt=False,
                chat_template=False, eval_path="", eval_fraction=0.0, seed=0)
  c.optim = dict(name="adamw", lr=2e-4 if kind != "none" else 3e-5, schedule="cosine",
                 warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.0, clip=1.0, b1=0.9,
                 b2=0.999, eps=1e-8)
  c.train = dict(steps=500, batch_size=8, seq_len=512, grad_accum=1, seed=0, log_every=10,
                 eval_every=100, save_every=100, keep=2, eval_batches=0, early_stop_patience=0,
                 async_save=True,
                 # Positions of T per LM-head chunk in the loss: the step holds one chunk's
                 # [B, chunk, V] float32 logits, not [B, T, V]. 0 = all at once.
                 logprob_chunk=256)
  # pjit: jax.jit with shardings on the mesh; pmap: data parallel over local devices.
  c.parallel = "pjit"
  c.mesh = dict(shape="data=-1", rules={}, distributed=False)
  if a.get("smoke"):
    c.train.update(steps=4, batch_size=4, seq_len=64, log_every=2, eval_every=2, save_every=2)
    c.mesh.shape = "data=1"
    c.optim.warmup_steps = 1
    c.adapter.update(rank=4, length=4)
  return c
