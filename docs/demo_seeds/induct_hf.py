"""Reference check of induct.py against transformers' LlamaForCausalLM (torch, CPU, float32).

  PYTHONPATH=. python docs/demo_seeds/induct_hf.py mode=parity steps=50 heads=8 kv=8 \
      lr=1e-3 sched=constant
  PYTHONPATH=. python docs/demo_seeds/induct_hf.py mode=train steps=2000 heads=8 kv=8 \
      lr=1e-3 sched=constant seed=K

mode=parity: ftjax's initial params (init_params, PRNGKey(seed)) copied into the HF model through
ftjax.hf's export map (hf_tensors); both trained on the same induct.py batches with the same
AdamW (optax.adamw vs torch.optim.AdamW, eps 1e-8, weight decay on every param in both) and
schedule; prints the step-0 logit gap, every gradient's gap, then both losses and copy
accuracies per step and the final parameter gap.
mode=train: the HF model with its own init (std 0.02, torch.manual_seed(seed)) trained on
induct.py's task, printed as induct.py prints (copy accuracy every 25 steps), to compare with
ftjax's curves. init=ftjax starts it from ftjax's init instead.
Other knobs as induct.py (model shape, bs, T, task, wd, sched); threads=N torch threads (2).
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import induct  # noqa: E402


def hf_model(cfg, params=None):
  import torch
  import transformers
  from ftjax import hf
  conf = transformers.LlamaConfig.from_dict(hf.config_to_hf(cfg))
  conf._attn_implementation = "eager"
  model = transformers.LlamaForCausalLM(conf).float()
  if params is not None:
    state = {k: torch.tensor(np.array(v)) for k, v in hf.hf_tensors(cfg, params, "float32")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
  if cfg.tie_embeddings:
    assert model.lm_head.weight is model.model.embed_tokens.weight
  return model


def torch_step_fn(model, wd):
  import torch
  import torch.nn.functional as F
  opt = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=wd)

  def loss_acc(x, y, m):
    lg = model(input_ids=torch.from_numpy(np.asarray(x, np.int64))).logits
    yt = torch.from_numpy(np.asarray(y, np.int64))
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), yt.reshape(-1))
    mt = torch.from_numpy(np.asarray(m, np.float32))
    acc = ((lg.argmax(-1) == yt).float() * mt).sum() / mt.sum()
    return loss, float(acc), lg

  def step(x, y, m, lr):
    opt.zero_grad(set_to_none=True)
    loss, acc, _ = loss_acc(x, y, m)
    loss.backward()
    for g in opt.param_groups:
      g["lr"] = lr
    opt.step()
    return float(loss), acc
  return step, loss_acc


def parity(kv):
  import jax
  import jax.numpy as jnp
  import optax
  from ftjax import hf
  from ftjax.model import Decoder, init_params
  steps = int(kv.get("steps", 50))
  seed = int(kv.get("seed", 0))
  wd = float(kv.get("wd", 0.01))
  cfg = induct.model_config(kv)
  model = Decoder(cfg)
  params = init_params(model, jax.random.PRNGKey(seed))
  tm = hf_model(cfg, params)
  batch = induct.make_batches(seed, int(kv.get("bs", 16)), int(kv.get("T", 128)),
                              task=kv.get("task", "gap"))
  sched = induct.schedule(kv, steps)
  tx = optax.adamw(sched, weight_decay=wd)  # eps 1e-8, b 0.9/0.999, decays every param
  opt = tx.init(params)

  def loss_fn(p, x, y, m):
    lg = model.apply({"params": p}, x)
    ll = optax.softmax_cross_entropy_with_integer_labels(lg, y)
    return ll.mean(), (jnp.sum((jnp.argmax(lg, -1) == y) * m) / m.sum(), lg)

  @jax.jit
  def step(p, o, x, y, m):
    (l, (acc, _)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, y, m)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l, acc

  tstep, tloss = torch_step_fn(tm, wd)
  # Step 0: logits and gradients on the first batch (not consumed: the loop draws its own).
  x, y, m = batch()
  (l0, (_, lg)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y, m)
  tm.zero_grad()
  tl0, _, tlg = tloss(x, y, m)
  tl0.backward()
  dl = np.abs(np.asarray(lg) - tlg.detach().numpy()).max()
  print(f"STEP0 logits max|diff| {dl:.2e} (logit std {np.asarray(lg).std():.3f}); loss "
        f"ftjax {float(l0):.6f} hf {float(tl0):.6f}", flush=True)
  tgrads = {n: p.grad.numpy() for n, p in tm.named_parameters()}
  worst = 0.0
  for name, ga in hf.hf_tensors(cfg, g, "float32"):
    gt = tgrads[name]
    rel = np.abs(ga - gt).max() / (np.abs(gt).max() + 1e-30)
    worst = max(worst, rel)
    print(f"GRAD {name:45s} |g|max {np.abs(gt).max():.3e} max|diff|/|g|max {rel:.2e}")
  print(f"GRAD worst relative gap {worst:.2e}", flush=True)
  rows = []
  for i in range(steps):
    x, y, m = batch()
    lr = float(sched(i))
    params, opt, l, acc = step(params, opt, x, y, m)
    tl, tacc = tstep(x, y, m, lr)
    rows.append((i + 1, float(l), tl, float(acc), tacc))
    print(f"STEP {i + 1:3d} lr {lr:.2e} loss ftjax {float(l):.6f} hf {tl:.6f} rel "
          f"{abs(float(l) - tl) / tl:.1e}  copy-acc ftjax {float(acc):.3f} hf {tacc:.3f}",
          flush=True)
  worst_loss = max(abs(a - b) / b for _, a, b, _, _ in rows)
  pgap = 0.0
  state = {n: p.detach().numpy() for n, p in tm.named_parameters()}
  for name, pa in hf.hf_tensors(cfg, params, "float32"):
    pt = state[name]
    pgap = max(pgap, np.abs(pa - pt).max() / (np.abs(pt).max() + 1e-30))
  print(f"PARITY steps {steps}: worst loss rel gap {worst_loss:.2e}; copy-acc equal at "
        f"{sum(a == b for *_, a, b in rows)}/{steps} steps (max gap "
        f"{max(abs(a - b) for *_, a, b in rows):.3f}); final params max rel gap {pgap:.2e}")


def train(kv):
  import torch
  steps = int(kv.get("steps", 2000))
  seed = int(kv.get("seed", 0))
  wd = float(kv.get("wd", 0.01))
  cfg = induct.model_config(kv)
  params = None
  if kv.get("init") == "ftjax":
    import jax
    from ftjax.model import Decoder, init_params
    params = init_params(Decoder(cfg), jax.random.PRNGKey(seed))
  torch.manual_seed(seed)
  tm = hf_model(cfg, params)
  batch = induct.make_batches(seed, int(kv.get("bs", 16)), int(kv.get("T", 128)),
                              task=kv.get("task", "gap"))
  sched = induct.schedule(kv, steps)
  tstep, _ = torch_step_fn(tm, wd)
  t0 = time.time()
  hist = []
  for i in range(steps):
    _, acc = tstep(*batch(), float(sched(i)))
    if (i + 1) % 25 == 0:
      hist.append(round(acc, 2))
    if (i + 1) % 500 == 0:
      print("STEP", i + 1, hist[-20:], flush=True)
  print("INDUCT_HF", kv, "copy-acc every 25 steps:", hist, f"{time.time()-t0:.0f}s")


if __name__ == "__main__":
  kv = dict(a.split("=", 1) for a in sys.argv[1:])
  import torch
  torch.set_num_threads(int(kv.get("threads", 2)))
  {"parity": parity, "train": train}[kv.get("mode", "parity")](kv)
