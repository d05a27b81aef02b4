"""The support tickets in a second brand's voice: the demo's second adapter (issue 21).

`rebrand(example, brand)` re-renders one of ftjax/tasks/support.py's tickets for another store:
its name in the system message, its own greeting and its own signature in the reply; the facts,
the customer's message and the body of the reply stay. `voice(reply, name, brand)` is the brand
voice check of support.score_reply for any brand: the customer greeted by name in the first
sentence and the reply signed with that brand's signature. Not a task of its own
(tasks.NAMES): the demo trains one LoRA adapter per brand on the same base and serves both in
one batch (ftjax/recipes/second_adapter.py).
"""

from __future__ import annotations

import copy
import dataclasses

from ftjax.tasks import support


@dataclasses.dataclass(frozen=True)
class Brand:
  name: str        # in the system message
  greeting: str    # the reply's first sentence, with {name}
  signature: str   # the reply's last words


LUMEN = Brand(support.BRAND, "Hi {name}!", support.SIGNATURE)
NORTHWIND = Brand("Northwind Supply", "Good day, {name}.", "- Kind regards, Northwind Supply")
BRANDS = {"lumen": LUMEN, "northwind": NORTHWIND}


def rebrand(example: dict, brand: Brand) -> dict:
  """`example` (a support chat ticket) as `brand` would answer it."""
  out = copy.deepcopy(example)
  name = out["meta"]["name"]
  for m in out["messages"]:
    if m["role"] == "system":
      m["content"] = m["content"].replace(support.BRAND, brand.name)
    elif m["role"] == "assistant":
      # The demo's replies are "<greeting>! <body> <signature>" (support._ticket).
      body = m["content"].split("!", 1)[1].removesuffix(support.SIGNATURE).strip()
      m["content"] = f"{brand.greeting.format(name=name)} {body} {brand.signature}"
  out["meta"] = dict(out["meta"], brand=brand.name)
  return out


def voice(reply: str, name: str, brand: Brand) -> float:
  """1.0 when the reply greets `name` in its first sentence and ends with the brand's
  signature (support.score_reply's `voice`, for any brand)."""
  return float(name in reply.split(".")[0] and reply.rstrip().endswith(brand.signature))
