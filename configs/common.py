"""Section builders shared by every config: each experiment's config is composed of them.

A config file parses its arg with `parse_arg`, starts from `base(a)` (every shared section:
model, adapter, quant, data, optim, train, parallel, mesh, allow_drift) or `preference(a, ...)`
(base with preference-pair data and the DPO / reward training defaults), then adds its own
section. A new algorithm does the same, as configs/ppo.py (configs/grpo.py instead starts from
configs/sft.py's config), e.g.

  ARG_KEYS = common.ARG_KEYS + ("critic",)

  def get_config(arg=None):
    a = common.parse_arg(arg, ARG_KEYS, "configs/ppo.py")
    prompts = dict(path="", sources=[], eval_path="", max_prompt_len=128, eval_rows=64)
    c = common.base(a, prompts)     # data_section: any data dict of its own
    c.ppo = dict(reward_model="", critic=a.get("critic", "shared"), kl_coef=0.05, ...)
    c.train.update(steps=100, batch_size=16)
    if a.get("smoke"):
      c.train.update(steps=4, batch_size=4)
    return c

Sections are plain dicts, so a config adds or changes keys before assigning them, and nothing
is removed afterwards (no `del c["dpo"]`): a config holds exactly the sections it uses.
`allow_drift` (False) and `data.cache_dir` are read by the workdir code (ftjax/provenance.py,
ftjax/data/cache.py) and need no handling in a config.
"""

import os

import ml_collections

from ftjax.errors import UserError

ARG_KEYS = ("model", "adapter", "quant", "format", "smoke")

DEMO_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ftjax",
                         "demo", "data")


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


def model(preset="tiny") -> dict:
  return dict(hf_path="", preset=preset, tokenizer="", dtype="float32", compute_dtype="",
              attention="xla", remat="none", seed=0, head="lm",
              matmul_precision="auto")  # auto: full float32 dots when computing in float32


def adapter(kind="lora") -> dict:
  """`kind`: none | lora | dora (LoRA with dora=True) | prefix | prompt | bottleneck (Houlsby /
  Pfeiffer adapters: `reduction_factor`, `placement` houlsby | pfeiffer)."""
  return dict(kind="lora" if kind == "dora" else kind, rank=8, alpha=16.0, dropout=0.0,
              targets="all-linear", rslora=False, dora=kind == "dora", init="kaiming",
              length=16, reparam=False, reparam_hidden=512, reduction_factor=16,
              placement="houlsby", train_extra="",
              dtype="float32")  # trainable adapter params, whatever model.dtype is


def quant(kind="none") -> dict:
  return dict(kind=kind, block_size=64, double_quant=True)


def data(format="chat", packing=True) -> dict:
  """SFT data (ftjax.data.build_dataset's keys). `cache_dir`: tokenized examples are cached
  there ("" = the workdir's data_cache/, "none" = no cache)."""
  return dict(path="", sources=[], format=format, fields={}, packing=packing,
              overflow="truncate", skip_malformed=False, loss_on_prompt=False,
              chat_template=False, eval_path="", eval_fraction=0.0, seed=0, cache_dir="")


def preference_data(format="auto") -> dict:
  """Preference pairs (ftjax.data.preference.build_preference_dataset's keys). No default
  files: a run on the user's data must not evaluate on the demo's. `max_prompt_length`: a pair
  too long for train.seq_len cuts its prompt from the left, down to this many tokens, before
  its responses (0: half of seq_len, TRL's old 512-of-1024 split; see ftjax/data/preference.py)."""
  return {**data(format), "max_prompt_length": 0}


def optim(lr) -> dict:
  return dict(name="adamw", lr=lr, schedule="cosine", warmup_steps=20, min_lr_ratio=0.1,
              weight_decay=0.0, clip=1.0, b1=0.9, b2=0.999, eps=1e-8)


def train() -> dict:
  return dict(steps=500, batch_size=8, seq_len=512, grad_accum=1, seed=0, log_every=10,
              eval_every=100, save_every=100, keep=2, eval_batches=0, early_stop_patience=0,
              async_save=True,
              # Positions of T per LM-head chunk in the loss: the step holds one chunk's
              # [B, chunk, V] float32 logits, not [B, T, V]. 0 = all at once.
              logprob_chunk=256,
              # Host offload (ftjax/offload.py): none | optimizer (optimizer state in pinned
              # host memory, moved in for the update) | activations (remat residuals in pinned
              # host memory) | both. pjit only.
              offload="none")


def mesh() -> dict:
  return dict(shape="data=-1", rules={}, distributed=False)


def base(a: dict, data_section: dict = None) -> ml_collections.ConfigDict:
  """Every shared section from a parsed arg (model=, adapter=, quant=, format=, smoke)."""
  kind = a.get("adapter", "lora")
  c = ml_collections.ConfigDict()
  c.model = model(a.get("model", "tiny"))
  c.adapter = adapter(kind)
  c.quant = quant(a.get("quant", "none"))
  # Prompt tuning prepends soft tokens to each row, so it takes one example per row.
  c.data = data_section if data_section is not None else data(a.get("format", "chat"),
                                                              packing=kind != "prompt")
  c.optim = optim(2e-4 if kind != "none" else 3e-5)
  c.train = train()
  # pjit: jax.jit with shardings on the mesh; pmap: data parallel over local devices.
  c.parallel = "pjit"
  c.mesh = mesh()
  # Resume with a config that differs from the saved one outside steps and the eval / log /
  # save cadence: refused unless this is True (ftjax/provenance.py).
  c.allow_drift = False
  if a.get("smoke"):
    smoke(c)
  return c


def smoke(c):
  """Shrink a config so it runs in CI in seconds."""
  c.train.update(steps=4, batch_size=4, seq_len=64, log_every=2, eval_every=2, save_every=2)
  c.mesh.shape = "data=1"
  c.optim.warmup_steps = 1
  c.adapter.update(rank=4, length=4)


def preference(a: dict, where: str) -> ml_collections.ConfigDict:
  """`base` with preference-pair data (`data=support`: the demo's pairs) and the DPO / reward
  defaults; the caller adds its algorithm's section."""
  which = a.get("data", "")
  if which not in ("", "support"):
    raise UserError(f"{where}: data={which!r}: expected support (or no data= and "
                    "--config.data.path=FILE)")
  pref = preference_data(a.get("format", "auto"))
  kind = a.get("adapter", "lora")
  pref["packing"] = kind != "prompt"
  if which == "support":
    pref.update(format="chat", path=os.path.join(DEMO_DATA, "prefs_train.jsonl"),
                eval_path=os.path.join(DEMO_DATA, "prefs_eval.jsonl"))
  c = base(a, pref)
  c.optim.update(lr=5e-4 if kind != "none" else 5e-6, warmup_steps=10)
  c.train.update(steps=200, batch_size=8, seq_len=256, eval_every=50, save_every=50)
  if a.get("smoke"):
    c.train.update(steps=4, batch_size=4, seq_len=256, eval_every=2, save_every=2)
  return c
