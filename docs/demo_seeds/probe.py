import sys, numpy as np, jax, jax.numpy as jnp
from ftjax import load_pretrained, generate
from ftjax.tokenizer import load_tokenizer
from ftjax.tasks import support
def probe(base, n=40, loaded=None):
  if loaded: model, params, tok = loaded
  else:
    model, params = load_pretrained(base); tok = load_tokenizer(base)
  rng = np.random.default_rng(123)
  @jax.jit
  def step(p, x, i):
    lg = model.apply({"params": p}, x)
    lg = lg[0] if isinstance(lg, tuple) else lg
    return jnp.argmax(lg[0, i])
  prompts, refs = [], []
  for i in range(n):
    name = support._pick(rng, support.NAMES); oid = support._order_id(rng); tr = support._tracking(rng)
    d = support._date(rng); prod = support.PRODUCTS[rng.integers(8)][0]; car = support._pick(rng, support.CARRIERS)
    st = f"shipped with {car}, tracking {tr}, arriving {d}"
    prompts.append(f"Customer: {name}. Order {oid}: {prod}, {st}. Note to")
    refs.append(f" {name}: order {oid} ({prod}) is {st}.")
  ok = {"name":0,"oid":0,"tr":0,"all":0}
  for p, r in zip(prompts, refs):
    ids = tok(p, add_special_tokens=False)["input_ids"]
    ids = [1] + ids
    L = 128; buf = np.zeros((1, L), np.int32); buf[0, :len(ids)] = ids; cur = len(ids)
    out = []
    for _ in range(len(tok(r, add_special_tokens=False)["input_ids"])):
      nxt = int(step(params, jnp.array(buf), cur - 1))
      out.append(nxt); buf[0, cur] = nxt; cur += 1
    txt = tok.decode(out)
    parts = r.split()
    ok["name"] += parts[0].rstrip(":") in txt; ok["oid"] += parts[2] in txt; ok["all"] += txt.strip() == r.strip()
    ok["tr"] += r.split("tracking ")[1].split(",")[0] in txt
  print("PROBE", ok, "of", len(prompts)); print(repr(txt)); print(repr(r))
  return ok

from ftjax import config as _fc
_fc.PRESETS["demo_x"] = _fc.PRESETS["demo"]
if __name__ == "__main__":
  if len(sys.argv) > 2:  # workdir step
    from ftjax import workdir as wd
    print("STEP", sys.argv[2]); probe(None, loaded=wd.load_trained(sys.argv[1], int(sys.argv[2]))[:3])
  else:
    probe(sys.argv[1])
