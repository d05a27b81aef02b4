"""How fast does the demo architecture learn to copy (induction)? Random spans repeated.

  PYTHONPATH=. python docs/demo_seeds/induct.py steps=2000 lr=1e-3 heads=8 kv=8 \
      sched=constant seed=K

Knobs (key=value): layers d heads kv lr steps tie seed alpha wd theta sched (cosine|constant),
bs (rows a step, 16), T (row length, 128), task: gap (session 5's: a 10-token code, 20-60
random filler tokens, the code again; ~1 code a row) | dense (codes and their repeats back to
back with 0-8 filler tokens between: most of the row is copy targets).
`make_batches` is shared with induct_hf.py (the transformers reference), so both see the same
batches from the same seed.
"""
import sys
import time

import numpy as np


def make_batches(seed, B=16, T=128, L=10, A=34, task="gap"):
  """A function that returns the next (x, y, m) numpy batch: inputs, targets [B, T-1] int,
  m [B, T-1] float32, 1 where the target is a repeated code token 2..L (its predecessor in the
  repeat is a code token too, so an induction head can predict it)."""
  rng = np.random.default_rng(seed)

  def gap():
    # filler text tokens 100..900; codes from an alphabet of A symbols (ids 10..10+A); code of L
    # tokens appears, then 20-60 filler tokens, then again.
    x = rng.integers(100, 900, (B, T))
    m = np.zeros((B, T), np.float32)
    for b in range(B):
      pos = 0
      while pos + 2 * L + 62 < T:
        code = rng.integers(10, 10 + A, L)
        g = rng.integers(20, 60)
        x[b, pos:pos + L] = code
        x[b, pos + L + g:pos + 2 * L + g] = code
        m[b, pos + L + g:pos + 2 * L + g - 1] = 1  # predicting code tokens 2..L
        pos += 2 * L + g + rng.integers(1, 5)
    return x[:, :-1], x[:, 1:], m[:, :-1]

  def dense():
    x = rng.integers(100, 900, (B, T))
    m = np.zeros((B, T), np.float32)
    for b in range(B):
      pos = int(rng.integers(0, 4))
      while pos + 2 * L + 8 < T:
        code = rng.integers(10, 10 + A, L)
        g = int(rng.integers(0, 9))
        x[b, pos:pos + L] = code
        x[b, pos + L + g:pos + 2 * L + g] = code
        m[b, pos + L + g:pos + 2 * L + g - 1] = 1
        pos += 2 * L + g + int(rng.integers(0, 4))
    return x[:, :-1], x[:, 1:], m[:, :-1]

  return {"gap": gap, "dense": dense}[task]


def schedule(kv, steps):
  import optax
  lr = float(kv.get("lr", 3e-3))
  # sched=constant: warmup then a flat lr (cosine decays it while the copying would form).
  if kv.get("sched") == "constant":
    return optax.join_schedules([optax.linear_schedule(0, lr, 20), optax.constant_schedule(lr)],
                                [20])
  return optax.warmup_cosine_decay_schedule(0, lr, 20, steps, lr * 0.1)


def model_config(kv):
  from ftjax import config as fcfg
  layers = int(kv.get("layers", 2))
  d = int(kv.get("d", 128))
  h = int(kv.get("heads", 4))
  return fcfg.PRESETS["demo"].replace(
      n_layers=layers, d_model=d, n_heads=h, n_kv_heads=int(kv.get("kv", 2)),
      head_dim=int(kv.get("hd", d // h)), tie_embeddings=kv.get("tie", "1") == "1",
      rope_theta=float(kv.get("theta", 10000)), mlp_dim=int(kv.get("mlp", 384)))


def main(argv):
  import jax
  import jax.numpy as jnp
  import optax
  from ftjax.model import Decoder, init_params
  kv = dict(a.split("=", 1) for a in argv)
  steps = int(kv.get("steps", 300))
  seed = int(kv.get("seed", 0))
  cfg = model_config(kv)
  model = Decoder(cfg)
  params = init_params(model, jax.random.PRNGKey(seed))
  batch = make_batches(seed, int(kv.get("bs", 16)), int(kv.get("T", 128)),
                       A=int(kv.get("alpha", 34)), task=kv.get("task", "gap"))
  tx = optax.adamw(schedule(kv, steps), weight_decay=float(kv.get("wd", 0.01)))
  opt = tx.init(params)

  @jax.jit
  def step(p, o, x, y, m):
    def loss(p):
      lg = model.apply({"params": p}, x)
      lg = lg[0] if isinstance(lg, tuple) else lg
      ll = optax.softmax_cross_entropy_with_integer_labels(lg, y)
      acc = (jnp.argmax(lg, -1) == y)
      return ll.mean(), (jnp.sum(acc * m) / m.sum())
    (l, acc), g = jax.value_and_grad(loss, has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l, acc

  t0 = time.time()
  hist = []
  for i in range(steps):
    params, opt, l, acc = step(params, opt, *map(jnp.asarray, batch()))
    if (i + 1) % 25 == 0:
      hist.append(round(float(acc), 2))
    if (i + 1) % 500 == 0:
      print("STEP", i + 1, hist[-20:], flush=True)
  print("INDUCT", kv, "copy-acc every 25 steps:", hist, f"{time.time()-t0:.0f}s")


if __name__ == "__main__":
  main(sys.argv[1:])
