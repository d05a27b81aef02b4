"""The ftjax package has no import circle: every `import` statement counts, at module level or
inside a function (a function-level import hides a cycle from Python, not from a reader)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_graph(root: str, pkg: str) -> dict:
  """module -> the set of the package's modules it imports (ast: top-level and nested)."""
  mods = {}
  for d, _, files in os.walk(os.path.join(root, pkg)):
    for f in files:
      if f.endswith(".py"):
        p = os.path.join(d, f)
        m = os.path.relpath(p, root)[:-3].replace(os.sep, ".")
        mods[m[:-len(".__init__")] if m.endswith(".__init__") else m] = p
  edges = {m: set() for m in mods}
  for m, p in mods.items():
    with open(p) as fh:
      tree = ast.parse(fh.read())
    here = m if p.endswith("__init__.py") else m.rsplit(".", 1)[0]
    for n in ast.walk(tree):
      names = []
      if isinstance(n, ast.Import):
        names = [a.name for a in n.names]
      elif isinstance(n, ast.ImportFrom):
        base = n.module or ""
        if n.level:
          parts = here.split(".")
          base = ".".join(parts[:len(parts) - n.level + 1] + ([base] if base else []))
        names = [base] + [f"{base}.{a.name}" for a in n.names]
      for t in names:
        while t and t not in mods:  # `from ftjax import losses` names ftjax.losses
          t = t.rsplit(".", 1)[0] if "." in t else ""
        if t and t != m and not m.startswith(t + "."):  # a package's own __init__ is no edge
          edges[m].add(t)
  return edges


def cycles(edges: dict) -> list:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def test_finder_sees_function_level_imports(tmp_path):
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg import b\n")
  (pkg / "b.py").write_text("def f():\n  from pkg.a import x\n")
  (pkg / "c.py").write_text("from . import a\n")
  assert cycles(import_graph(str(tmp_path), "pkg")) == [["pkg.a", "pkg.b"]]


def test_ftjax_has_no_import_cycle():
  edges = import_graph(ROOT, "ftjax")
  assert len(edges) > 40 and edges["ftjax.workdir"]  # the finder saw the package
  assert cycles(edges) == []


def imported_modules(path: str) -> set:
  """Every module an `import` statement in the file names (top-level and nested)."""
  with open(path) as fh:
    tree = ast.parse(fh.read())
  out = set()
  for n in ast.walk(tree):
    if isinstance(n, ast.Import):
      out.update(a.name for a in n.names)
    elif isinstance(n, ast.ImportFrom) and not n.level:
      out.update([n.module] + [f"{n.module}.{a.name}" for a in n.names])
  return out


def test_scripts_and_tests_import_ftjax_not_experiments():
  """experiments/ holds entry points: none imports another, and neither ftjax nor the tests
  import them (tests run them as subprocesses)."""
  offenders = []
  for d in ("experiments", "tests", "ftjax"):
    for root, _, files in os.walk(os.path.join(ROOT, d)):
      for f in sorted(files):
        if f.endswith(".py"):
          p = os.path.join(root, f)
          bad = sorted(m for m in imported_modules(p)
                       if m == "experiments" or m.startswith("experiments."))
          if bad:
            offenders.append(f"{os.path.relpath(p, ROOT)}: {', '.join(bad)}")
  assert len(os.listdir(os.path.join(ROOT, "experiments"))) > 5  # the walk saw the scripts
  assert offenders == []
