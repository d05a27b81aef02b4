"""How fast does the demo architecture learn to copy (induction)? Random spans repeated."""
import sys, time, numpy as np, jax, jax.numpy as jnp, optax
from ftjax import config as fcfg
from ftjax.model import Decoder, init_params
kv = dict(a.split("=", 1) for a in sys.argv[1:])
layers = int(kv.get("layers", 2)); d = int(kv.get("d", 128)); h = int(kv.get("heads", 4))
kvh = int(kv.get("kv", 2)); lr = float(kv.get("lr", 3e-3)); steps = int(kv.get("steps", 300))
tie = kv.get("tie", "1") == "1"; seed = int(kv.get("seed", 0)); A = int(kv.get("alpha", 34))
wd = float(kv.get("wd", 0.01)); theta = float(kv.get("theta", 10000))
cfg = fcfg.PRESETS["demo"].replace(n_layers=layers, d_model=d, n_heads=h, n_kv_heads=kvh,
                                   head_dim=d // h, tie_embeddings=tie, rope_theta=theta)
model = Decoder(cfg)
params = init_params(model, jax.random.PRNGKey(seed))
B, T, L = 16, 128, 10
rng = np.random.default_rng(seed)
def batch():
  # filler text tokens 100..900; codes from an alphabet of A symbols (ids 10..10+A); code of L
  # tokens appears, then 20-60 filler tokens, then again.
  x = rng.integers(100, 900, (B, T)); m = np.zeros((B, T), np.float32)
  for b in range(B):
    pos = 0
    while pos + 2 * L + 62 < T:
      code = rng.integers(10, 10 + A, L); gap = rng.integers(20, 60)
      x[b, pos:pos + L] = code; x[b, pos + L + gap:pos + 2 * L + gap] = code
      m[b, pos + L + gap:pos + 2 * L + gap - 1] = 1  # predicting code tokens 2..L
      pos += 2 * L + gap + rng.integers(1, 5)
  return jnp.array(x[:, :-1]), jnp.array(x[:, 1:]), jnp.array(m[:, :-1])
# sched=constant: warmup then a flat lr (cosine decays it while the copying would form).
sched = (optax.join_schedules([optax.linear_schedule(0, lr, 20), optax.constant_schedule(lr)], [20])
         if kv.get("sched") == "constant" else
         optax.warmup_cosine_decay_schedule(0, lr, 20, steps, lr * 0.1))
tx = optax.adamw(sched, weight_decay=wd)
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
t0 = time.time(); hist = []
for i in range(steps):
  params, opt, l, acc = step(params, opt, *batch())
  if (i + 1) % 25 == 0:
    hist.append(round(float(acc), 2))
  if (i + 1) % 500 == 0:
    print("STEP", i + 1, hist[-20:], flush=True)
print("INDUCT", kv, "copy-acc every 25 steps:", hist, f"{time.time()-t0:.0f}s")
