"""The built-in demo: a customer-support assistant for an online retailer (Lumen Outfitters).

The seed lecture notes' running example. Each ticket carries its facts in the system message
(the orders on file, the return policy, the product sheet); the assistant must
  * quote the order details given in the ticket, and never invent an order number,
  * escalate to a human when the customer asks for one or when the order is not on file,
  * keep the brand voice: a greeting by name and the team signature.

`make_tickets` generates chat examples deterministically from a seed; `make_pretraining_text`
generates plain retail text (order e-mails, product pages, FAQ) for the small base model
that ftjax trains itself when no base is given; `score_reply` is the evaluation, and
`support_scorer` (the reward `support_scorer` of `grpo.rewards`) its mean as a reward.
The shipped data are in ftjax/demo/data (configs name those paths).
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable

import numpy as np

from ftjax.errors import UserError
from ftjax.rewards import text_of

BRAND = "Lumen Outfitters"
SIGNATURE = "- The Lumen Outfitters Team"
ESCALATION = "I have passed your ticket to a human colleague"
SYSTEM = (f"You are the support assistant of {BRAND}. Use only the facts below. Escalate to a "
          "human when the order is not on file or when the customer asks for a person.")

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kai",
         "Lena", "Max", "Nora", "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic",
         "Wes", "Yara", "Zoe"]
CARRIERS = ["UPS", "DHL", "FedEx", "USPS"]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
PRODUCTS = [
    ("Trailblazer Jacket", "waterproof", "129"), ("Summit Boots", "leather", "149"),
    ("Breeze Tee", "organic cotton", "25"), ("Harbor Hoodie", "fleece-lined", "59"),
    ("Canyon Pack", "30 litre", "89"), ("Drift Shorts", "quick-dry", "35"),
    ("Ember Beanie", "merino wool", "22"), ("Ridge Gloves", "touchscreen", "29"),
]
SIZES = ["XS-XL", "S-XXL", "one size", "S-L"]


def _order_id(rng) -> str:
  return f"#{rng.integers(10000, 99999)}"


def _tracking(rng) -> str:
  letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
  return "".join(rng.choice(list(letters + "0123456789"), 8))


def _date(rng) -> str:
  return f"{MONTHS[rng.integers(12)]} {rng.integers(1, 29)}"


def _pick(rng, options):
  return options[rng.integers(len(options))]


def _greet(name, rng) -> str:
  return _pick(rng, [f"Hi {name}!", f"Hello {name}!", f"Thanks for reaching out, {name}!"])


def _ticket(rng) -> dict:
  """One ticket: the facts on file, the customer's message, the ideal reply, and what to check."""
  name = _pick(rng, NAMES)
  intent = _pick(rng, ["status", "status", "status", "return", "product", "unknown", "human"])
  oid, carrier, track, date = _order_id(rng), _pick(rng, CARRIERS), _tracking(rng), _date(rng)
  prod, feature, price = PRODUCTS[rng.integers(len(PRODUCTS))]
  state = _pick(rng, ["shipped", "processing", "delivered"])
  facts = f"Customer: {name}."
  required, escalate = [], False
  if intent in ("status", "return", "human"):
    if state == "shipped":
      facts += f" Order {oid}: {prod}, shipped with {carrier}, tracking {track}, arriving {date}."
    elif state == "processing":
      facts += f" Order {oid}: {prod}, processing, ships by {date}."
    else:
      facts += f" Order {oid}: {prod}, delivered on {date}."
  if intent == "product":
    facts += f" Product: {prod}, {feature}, sizes {_pick(rng, SIZES)}, price ${price}."
  if intent == "return":
    facts += " Returns: free within 30 days, label by e-mail."
  greet = _greet(name, rng)
  if intent == "status":
    user = _pick(rng, [f"Where is my order {oid}?", f"Any update on order {oid}?",
                       f"hi, when will {oid} arrive", f"Can you check the status of {oid}?"])
    if state == "shipped":
      body = (f"Your order {oid} shipped with {carrier}. The tracking number is {track} and "
              f"it should arrive on {date}.")
      required = [oid, carrier, track, date]
    elif state == "processing":
      body = f"Your order {oid} is being prepared and will ship by {date}."
      required = [oid, date]
    else:
      body = f"Your order {oid} was delivered on {date}. Enjoy your {prod}!"
      required = [oid, date]
  elif intent == "return":
    user = _pick(rng, [f"I want to return the {prod} from order {oid}.",
                       f"How do I send back order {oid}?", f"The {prod} doesn't fit, order {oid}"])
    body = (f"Returns for order {oid} are free within 30 days. We will e-mail you a return "
            f"label for the {prod}.")
    required = [oid, "30 days"]
  elif intent == "product":
    user = _pick(rng, [f"Tell me about the {prod}.", f"Is the {prod} any good?",
                       f"How much is the {prod}?"])
    body = f"The {prod} is {feature} and costs ${price}."
    required = [prod, f"${price}"]
  elif intent == "unknown":
    other = _order_id(rng)
    facts += " No orders on file."
    user = _pick(rng, [f"Where is my order {other}?", f"Status of {other} please",
                       f"My package {other} never came"])
    body = f"I could not find order {other} in our system. {ESCALATION}, who will e-mail you."
    required, escalate = [other], True
  else:
    user = _pick(rng, ["I want to talk to a human.", "Can I speak to a real person?",
                       f"This is taking too long, get me a manager about {oid}."])
    body = f"Of course. {ESCALATION}, who will e-mail you shortly."
    escalate = True
  reply = f"{greet} {body} {SIGNATURE}"
  return {"messages": [{"role": "system", "content": f"{SYSTEM} {facts}"},
                       {"role": "user", "content": user},
                       {"role": "assistant", "content": reply}],
          "meta": {"intent": intent, "required": required, "escalate": escalate, "name": name}}


def make_tickets(n: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [_ticket(rng) for _ in range(n)]


def make_pretraining_text(n: int, seed: int) -> list[dict]:
  """Plain retail text: order e-mails, product pages and FAQ entries (no chat format)."""
  rng = np.random.default_rng(seed)
  docs = []
  for _ in range(n):
    kind = rng.integers(7)
    name, oid, carrier = _pick(rng, NAMES), _order_id(rng), _pick(rng, CARRIERS)
    track, date = _tracking(rng), _date(rng)
    prod, feature, price = PRODUCTS[rng.integers(len(PRODUCTS))]
    if kind == 0:
      text = (f"Dear {name}, your order {oid} has shipped with {carrier}. Tracking number: "
              f"{track}. Expected delivery: {date}. Order {oid} contains: {prod}.")
    elif kind == 1:
      text = (f"{prod}: {feature}, sizes {_pick(rng, SIZES)}. Price ${price}. The {prod} is "
              f"{feature} and costs ${price}.")
    elif kind == 2:
      text = (f"Order {oid} for {name} was delivered on {date}. Questions about order {oid}? "
              f"Reply to this e-mail.")
    elif kind in (3, 4):
      # A record, then a note that quotes it: teaches copying facts from context.
      state = _pick(rng, [f"shipped with {carrier}, tracking {track}, arriving {date}",
                          f"delivered on {date}", f"processing, ships by {date}"])
      text = (f"Customer: {name}. Order {oid}: {prod}, {state}. Note to {name}: order {oid} "
              f"({prod}) is {state}.")
    elif kind == 5:
      # A ticket header, then an e-mail reply that greets the customer by name.
      text = (f"Ticket from {name} about order {oid}. Reply: {_greet(name, rng)} We are looking "
              f"into order {oid} for you. {SIGNATURE}")
    else:
      text = _pick(rng, [
          "Returns are free within 30 days. We e-mail a return label.",
          "Can't find your order? Our team checks it and a human colleague will e-mail you.",
          f"Shipping with {carrier} takes 3 to 5 days. Tracking {track} is live.",
      ])
    docs.append({"text": text})
  return docs


# The shipped base's pretraining corpus (ftjax/demo/base, `experiments/demo.py --pretrain`):
# fresh documents, about one pass in 3000 steps. The 4000 documents of pretrain.jsonl, seen 16
# times in 1200 steps, are memorised (random order numbers included), and copying from context
# never wins: the bases that came out of them quoted order numbers and names on some seeds only
# (docs/demo_seeds/README.md). Half are support threads in plain text (no chat template): the
# reply greets the customer and quotes the facts the way the chat replies do.
BASE_CORPUS = dict(n=170000, seed=1000, thread_seed=7000, threads=0.5)


def make_base_corpus(n: int = BASE_CORPUS["n"], seed: int = 0,
                     threads: float = BASE_CORPUS["threads"]) -> list[dict]:
  """`make_pretraining_text(n, 1000 + seed)` with a `threads` fraction of its documents replaced
  by support threads: "Support ticket. <facts>\nMessage: <user>\nReply:\n<reply>"."""
  docs = make_pretraining_text(n, BASE_CORPUS["seed"] + seed)
  rng = np.random.default_rng(BASE_CORPUS["thread_seed"] + seed)
  for i in range(len(docs)):
    if rng.random() < threads:
      docs[i] = {"text": _thread_text(_ticket(rng))}
  return docs


def _thread_text(ticket: dict) -> str:
  system, user, reply = (m["content"] for m in ticket["messages"])
  return f"Support ticket. {system[len(SYSTEM) + 1:]}\nMessage: {user}\nReply:\n{reply}"


def copy_drills(n: int, rng, kinds=("codes", "ship")) -> list[str]:
  """n documents whose loss is mostly copying from earlier in the document, kinds in turn:
  codes = four names with a carrier and a tracking code each, then the four again shuffled
  (~36 of ~108 tokens are copies); pairs = the same with each name right before its carrier;
  ship = a plain-text support thread of a shipped order (the reply quotes carrier and code);
  rep = two parcels on file, then a line quoting both again."""
  out, shipped = [], []
  for i in range(n):
    kind = kinds[i % len(kinds)]
    if kind == "ship":
      while not shipped:
        shipped = [t for t in (_ticket(rng) for _ in range(200)) if len(t["meta"]["required"]) == 4]
      out.append(_thread_text(shipped.pop()))
    elif kind == "rep":
      a, b = _pick(rng, NAMES), _pick(rng, NAMES)
      ca, cb = _tracking(rng), _tracking(rng)
      car_a, car_b = _pick(rng, CARRIERS), _pick(rng, CARRIERS)
      out.append(f"Parcel for {a}: {car_a}, tracking {ca}. Parcel for {b}: {car_b}, tracking "
                 f"{cb}. {a}'s parcel is with {car_a}, tracking number {ca}; {b}'s is with "
                 f"{car_b}, tracking number {cb}.")
    elif kind == "codes":
      names = [_pick(rng, NAMES) for _ in range(4)]
      items = [(nm, _pick(rng, CARRIERS), _tracking(rng)) for nm in names]
      first = " ".join(f"{nm}: {c} {t}." for nm, c, t in items)
      again = " ".join(f"{nm}: {c} {t}." for nm, c, t in (items[j] for j in rng.permutation(4)))
      out.append(f"Parcels on file. {first}\nAgain: {again}")
    elif kind == "pairs":
      items = [(_pick(rng, NAMES), _pick(rng, CARRIERS), _tracking(rng)) for _ in range(4)]
      first = ", ".join(f"{nm} {c} {t}" for nm, c, t in items)
      again = ", ".join(f"{nm} {c} {t}" for nm, c, t in (items[j] for j in rng.permutation(4)))
      out.append(f"Parcels: {first}.\nAgain: {again}.")
    else:
      raise ValueError(f"copy_drills: unknown kind {kind!r} (codes, pairs, ship, rep)")
  return out


# The shipped base's corpus since session 8 (`experiments/demo.py --pretrain`): `make_base_corpus`
# documents with half of them replaced by copy drills. Without drills a 2-layer base never formed
# an induction circuit in a CPU-sized pretraining: it could not copy a ticket's 8-character
# tracking code, so every shipped order's reply missed (docs/demo_seeds/README.md, sessions 7-8).
# One pass of 4000 steps x 16 rows (~2 documents a 128-token row). `seed` + 1 is the corpus
# seed, so its documents are not those of the session-7 base's corpus (seed 0).
COPY_CORPUS = dict(n=130000, drill_seed=9000, drills=0.5, kinds=("codes", "ship"))


def make_copy_corpus(n: int = COPY_CORPUS["n"], seed: int = 0,
                     drills: float = COPY_CORPUS["drills"],
                     kinds=COPY_CORPUS["kinds"]) -> list[dict]:
  """`make_base_corpus(n, seed + 1)` with a `drills` fraction of its documents replaced by
  `copy_drills` of `kinds`."""
  docs = make_base_corpus(n, seed + 1)
  rng = np.random.default_rng(COPY_CORPUS["drill_seed"] + seed + 1)
  pick = np.flatnonzero(rng.random(n) < drills)
  for i, text in zip(pick, copy_drills(len(pick), rng, tuple(kinds))):
    docs[i] = {"text": text}
  return docs


def make_preference_pairs(n: int, seed: int) -> list[dict]:
  """(prompt, chosen, rejected) in chat form: the gold reply beats one that invents an order
  number, drops the brand voice, or gets the escalation wrong. `meta` keeps the ticket facts."""
  rng = np.random.default_rng(seed)
  pairs = []
  for ticket in make_tickets(n, seed):
    gold = ticket["messages"][-1]["content"]
    meta = ticket["meta"]
    ids = _ORDER_RX.findall(gold)
    flaws = ["rude"] + (["invent"] if ids else []) + ["escalation"]
    flaw = _pick(rng, flaws)
    if flaw == "invent":
      bad = gold.replace(ids[0], _order_id(rng))
    elif flaw == "rude":
      body = gold.split("!", 1)[1].replace(SIGNATURE, "").strip()
      bad = f"{_pick(rng, ['Whatever.', 'Read the e-mail.', 'Not my problem.'])} {body}"
    elif meta["escalate"]:
      bad = f"{gold.split('!', 1)[0]}! There is nothing I can do. {SIGNATURE}"
    else:
      bad = f"{gold.split('!', 1)[0]}! {ESCALATION}, who will e-mail you. {SIGNATURE}"
    pairs.append({"prompt": prompt_messages(ticket),
                  "chosen": [{"role": "assistant", "content": gold}],
                  "rejected": [{"role": "assistant", "content": bad}],
                  "meta": dict(meta, flaw=flaw)})
  return pairs


def true_reward(reply: str, example: dict) -> float:
  """The preference task's known reward in [0, 1]: the mean of the four checks of
  `score_reply` (details counted as 1 where the ticket has none)."""
  s = score_reply(reply, example)
  details = 1.0 if np.isnan(s["details"]) else s["details"]
  return float((details + (1.0 - s["invented"]) + s["escalation_ok"] + s["voice"]) / 4.0)


_ORDER_RX = re.compile(r"#\d{5}")


def _ticket_text(example: dict) -> str:
  msgs = example.get("prompt") if isinstance(example.get("prompt"), list) else [
      m for m in example["messages"] if m["role"] != "assistant"]
  return " ".join(m["content"] for m in msgs)


def score_reply(reply: str, example: dict) -> dict:
  """Check one reply against its ticket (a chat example or a preference pair).

  Returns floats: details (all required facts quoted; NaN when the ticket has none),
  invented (the reply has an order number that is nowhere in the ticket), escalation_ok
  (escalates exactly when it should), voice (greets by name and signs off).
  """
  meta = example["meta"]
  ticket_text = _ticket_text(example)
  allowed = set(_ORDER_RX.findall(ticket_text))
  invented = any(o not in allowed for o in _ORDER_RX.findall(reply))
  details = (float(all(r in reply for r in meta["required"])) if meta["required"]
             else float("nan"))
  escalated = "human colleague" in reply
  voice = meta["name"] in reply.split(".")[0] and reply.rstrip().endswith(SIGNATURE)
  return {"details": details, "invented": float(invented),
          "escalation_ok": float(escalated == meta["escalate"]), "voice": float(voice)}


# Which way `score_reply`'s metrics are better (reports' best/ columns).
LOWER_BETTER = ("invented",)
HIGHER_BETTER = ("details", "escalation_ok", "voice")


def summarize(scores: Iterable[dict]) -> dict:
  scores = list(scores)
  out = {}
  for k in ("details", "invented", "escalation_ok", "voice"):
    vals = [s[k] for s in scores if not np.isnan(s[k])]
    out[k] = float(np.mean(vals)) if vals else float("nan")
  return out


def prompt_messages(example: dict) -> list[dict]:
  """The conversation up to (not including) the assistant's reply."""
  return [m for m in example["messages"] if m["role"] != "assistant"]


def write_jsonl(path: str, rows: list[dict]):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


class support_scorer:  # noqa: N801 (a reward factory, named like TRL's)
  """The task reward in [0, 1] (`true_reward`: order details quoted, no invented order number,
  right escalation, brand voice), TRL's reward signature. Needs the rows' `meta` column."""

  __name__ = "support_scorer"

  def __call__(self, prompts, completions, **columns) -> list:
    if "meta" not in columns:
      raise UserError("reward support_scorer: the dataset has no 'meta' column (use the support "
                      "demo's rows)")
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
      example = {"prompt": p if isinstance(p, list) else [{"role": "user", "content": p}],
                 "meta": columns["meta"][i]}
      out.append(true_reward(text_of(c), example))
    return out


REWARDS = {"support_scorer": support_scorer}

# Where the shipped data stay, whatever module generates them: the configs' data paths (and so
# every workdir's config.json) name these files.
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo",
                        "data")
# The shipped files (seeds fixed so they can be regenerated byte for byte).
SPLITS = {"train": (1600, 0), "eval": (120, 1)}
PRETRAIN = (4000, 2)
PREFERENCES = {"prefs_train": (800, 3), "prefs_eval": (96, 4)}


def regenerate(data_dir: str = DATA_DIR):
  """Write train.jsonl, eval.jsonl, pretrain.jsonl and the preference pairs (what ships in
  ftjax/demo/data)."""
  for split, (n, seed) in SPLITS.items():
    write_jsonl(os.path.join(data_dir, f"{split}.jsonl"), make_tickets(n, seed))
  write_jsonl(os.path.join(data_dir, "pretrain.jsonl"), make_pretraining_text(*PRETRAIN))
  for split, (n, seed) in PREFERENCES.items():
    write_jsonl(os.path.join(data_dir, f"{split}.jsonl"), make_preference_pairs(n, seed))


if __name__ == "__main__":
  regenerate()


def card_limitations(metrics: dict) -> list[str]:
  """The model card's failure figures (ftjax/model_card.py) from a run's last eval: the rate of
  replies with an invented order number, with its Wilson interval where its counts were logged."""
  from ftjax import stats
  key = next((k for k in metrics if k.rsplit("/", 1)[-1] in ("invented", "eval_invented")),
             None)
  if key is None:
    return ["Invented order numbers: not measured by this run's eval; measure them with "
            "`python experiments/eval.py --task=support --model=THIS_DIR --data=FILE`."]
  k, n = metrics.get(f"{key}_k"), metrics.get(f"{key}_n")
  if isinstance(k, (int, float)) and isinstance(n, (int, float)) and n >= 1 and k == int(k):
    return ["Replies quoting an order number that is not in the ticket (invented): "
            + stats.format_proportion("invented", int(k), int(n))]
  return [f"Replies quoting an order number that is not in the ticket (invented): "
          f"{100 * float(metrics[key]):.1f}% of held-out replies (no counts logged: no interval)"]
