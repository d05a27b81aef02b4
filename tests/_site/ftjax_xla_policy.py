"""The test suite's XLA compile policy, for the pytest processes (tests/conftest.py) and every
Python they start (sitecustomize.py here, on their PYTHONPATH).

LLVM's optimizations and XLA's fusion emitters cost more compile time than they save on the
suite's programs: thousands of eager ops and small steps, each run a few times. So a program
compiles at -O0 with XLA's loop emitters, except a token-generation program (`jit__generate`)
whose largest array is large: it runs its body once per new token, for every prompt batch of an
evaluation, so it pays for XLA's defaults (-O3, fusion emitters). It applies only while
XLA_FLAGS holds `--xla_backend_optimization_level=0` (which conftest adds unless the caller chose
a level). The options are part of the persistent cache key, and the choice depends only on the
program, so every process compiles a program alike and shares it.
"""

import math
import os
import re
import sys

# A generation program whose largest array has this many elements (4 MiB of float32) or more.
LARGE_GENERATION = 1 << 20
_MODULE_NAME = re.compile(r"module @(\S+)")
FLAG = "--xla_backend_optimization_level=0"
_TENSOR_TYPE = re.compile(r"tensor<((?:\d+x)+)[a-z]")


def largest_array(module_text: str) -> int:
  return max((math.prod(int(d) for d in dims[:-1].split("x"))
              for dims in _TENSOR_TYPE.findall(module_text)), default=0)


def optimized(computation) -> bool:
  """Whether the program (an MLIR module, or its text) gets XLA's defaults: a large generation
  loop (see the docstring)."""
  try:
    name = computation.operation.attributes["sym_name"].value
  except (AttributeError, KeyError):
    found = _MODULE_NAME.search(str(computation))
    name = found and found.group(1)
  return name == "jit__generate" and largest_array(str(computation)) >= LARGE_GENERATION


def active() -> bool:
  return FLAG in os.environ.get("XLA_FLAGS", "").split()


def wrap(compiler) -> None:
  """Wraps `jax._src.compiler.compile_or_get_cached` (once) to set the options per program."""
  inner = compiler.compile_or_get_cached
  if getattr(inner, "ftjax_policy", False):
    return

  from jax._src import config

  def compile_or_get_cached(backend, computation, devices, compile_options, *args, **kwargs):
    if (config.optimization_level.value == "O3"  # conftest's `xla_default_compiler`
        or optimized(computation)):
      compile_options.executable_build_options.debug_options.xla_backend_optimization_level = 3
    else:
      compile_options.env_option_overrides = [
          *compile_options.env_option_overrides, ("xla_cpu_use_fusion_emitters", False)]
    return inner(backend, computation, devices, compile_options, *args, **kwargs)

  compile_or_get_cached.ftjax_policy = True
  compiler.compile_or_get_cached = compile_or_get_cached
  _reuse_ir_contexts()


CONTEXT_USES = 64


def _reuse_ir_contexts() -> None:
  """jax makes a fresh MLIR context (all its dialects loaded, ~3 ms) for every program it
  lowers: the suite's thousands of eager ops and steps spent ~80 CPU-s there. Here a thread
  reuses one context for CONTEXT_USES lowerings, then starts a new one (a context keeps the
  attributes it uniqued, e.g. constants, until it is dropped). The lowered text is the same."""
  import threading
  from jax._src.interpreters import mlir
  make = mlir.make_ir_context
  if getattr(make, "ftjax_policy", False):
    return
  local = threading.local()

  def make_ir_context():
    uses = getattr(local, "uses", CONTEXT_USES)
    if uses >= CONTEXT_USES:
      local.context, uses = make(), 0
    local.uses = uses + 1
    return local.context

  make_ir_context.ftjax_policy = True
  mlir.make_ir_context = make_ir_context


class _WrapOnImport:
  """A meta-path finder that wraps jax's compiler module once it is executed, so a process that
  never imports jax imports nothing more (tests check what a module imports)."""

  def find_spec(self, name, path=None, target=None):
    if name != "jax._src.compiler":
      return None
    sys.meta_path.remove(self)
    import importlib.util
    spec = importlib.util.find_spec(name)
    execute = spec.loader.exec_module

    def exec_module(module):
      execute(module)
      wrap(module)

    spec.loader.exec_module = exec_module
    return spec


def install() -> None:
  if not active():
    return
  if "jax._src.compiler" in sys.modules:
    wrap(sys.modules["jax._src.compiler"])
  elif not any(isinstance(f, _WrapOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _WrapOnImport())
