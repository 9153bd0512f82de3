"""The shape of the code: import graph, the toy's place, citations, flags, function length.

These read the source (ast), so they are fast; each guards a rule of the README's "Layout"
section that is easy to break without noticing.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

from tests.helpers import REPO

PACKAGE = os.path.join(REPO, "lcm_jax")
# Model definitions mirror diffusers' block structure (long __call__s on purpose).
MODEL_FILES = {"lcm_jax/models/unet.py", "lcm_jax/models/vae.py", "lcm_jax/models/clip.py",
               "lcm_jax/models/layers.py"}
MAX_FUNCTION_LINES = 80


def python_files(root: str) -> list[str]:
  out = []
  for folder, _, files in os.walk(root):
    out.extend(os.path.join(folder, f) for f in files if f.endswith(".py"))
  return sorted(out)


def module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
  return rel.removesuffix(".__init__")


MODULES = {module_name(p): p for p in python_files(PACKAGE)}


def imported_modules(path: str) -> set[str]:
  """The lcm_jax modules a file imports anywhere (module level or inside functions).

  `from a import b` counts as a.b when a.b is a module, else as a; relative imports are
  resolved against the file's package.
  """
  tree = ast.parse(open(path).read(), path)
  package = module_name(path) if path.endswith("__init__.py") else module_name(path).rpartition(".")[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    else:
      continue
    out.update(n for n in names if n in MODULES)
  return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of `graph` (node -> successors) as a list of nodes, or None."""
  colour, stack = {}, []

  def visit(node):  # depth-first; a grey node met again closes a cycle
    colour[node] = "grey"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if colour.get(nxt) == "grey":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in colour and (cycle := visit(nxt)):
        return cycle
    stack.pop()
    colour[node] = "black"
    return None

  for name in sorted(graph):
    if name not in colour and (cycle := visit(name)):
      return cycle
  return None


def test_the_import_graph_of_lcm_jax_has_no_cycle():
  graph = {name: imported_modules(path) - {name} for name, path in MODULES.items()}
  assert len(graph) > 30  # the walk saw the package
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
  """The checker itself: an import inside a function is an edge, and a two-module loop is found."""
  probe = tmp_path / "probe.py"
  probe.write_text("def f():\n  from lcm_jax import workdir\n  from lcm_jax.training.loop import Loop\n")
  assert imported_modules(str(probe)) == {"lcm_jax.workdir", "lcm_jax.training.loop"}
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_library_never_imports_the_toy():
  offenders = [f"{name} imports {m}" for name, path in MODULES.items() if not name.startswith("lcm_jax.toy")
               for m in imported_modules(path) if m.startswith("lcm_jax.toy")]
  offenders += [f"{p} imports the toy" for p in python_files(os.path.join(REPO, "tests", "helpers"))
                if re.search(r"lcm_jax\.toy|from lcm_jax import toy", open(p).read())]
  assert not offenders, offenders


def test_every_citation_points_into_the_repository():
  """Code, tests, configs and docs cite files of this repository only, and those files exist."""
  roots = [PACKAGE, os.path.join(REPO, "tests"), os.path.join(REPO, "configs")]
  files = [p for r in roots for p in python_files(r)]
  files += [os.path.join(REPO, "README.md")] + [os.path.join(REPO, "docs", f)
                                                  for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md")]
  missing, outside = [], []
  for path in files:
    text = open(path).read()
    if path == os.path.abspath(__file__):
      continue
    if re.search(r"\bREFERENCE\.md|\bDESIGN\.md|\.\./shared/", text):
      outside.append(os.path.relpath(path, REPO))
    for cited in re.findall(r"\bdocs/[\w/.-]+\.md\b", text):
      if not os.path.isfile(os.path.join(REPO, cited)):
        missing.append(f"{os.path.relpath(path, REPO)} cites {cited}")
  assert not outside, f"cite files outside the repository: {outside}"
  assert not missing, missing


def test_no_function_is_longer_than_80_lines():
  long = []
  for name, path in MODULES.items():
    rel = os.path.relpath(path, REPO)
    if rel in MODEL_FILES:
      continue
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
  assert not long, long


IMPORT_ALL = r"""
import importlib, pkgutil, sys
from absl import flags
import lcm_jax
names = [m.name for m in pkgutil.walk_packages(lcm_jax.__path__, "lcm_jax.")] + sys.argv[1:]
for name in names:
  importlib.import_module(name)
ours = {module: [f.name for f in fl] for module, fl in flags.FLAGS.flags_by_module_dict().items()
        if module.startswith("lcm_jax")}
print(len(names), "modules; lcm_jax flags defined at import:", ours)
"""
DEFINES_A_FLAG = "from absl import flags\nflags.DEFINE_string('model', None, 'probe')\n"


def test_every_module_imports_in_one_process_and_defines_no_flags(tmp_path):
  """Any two command-line modules can be imported together: none defines absl flags on import
  (they do it in define_flags(), when run), so no DuplicateFlagError can arise."""
  r = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, cwd=REPO,
                     timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "lcm_jax flags defined at import: {}" in r.stdout, r.stdout
  # The check sees a flag defined at import (a probe module beside the package).
  (tmp_path / "lcm_jax_probe.py").write_text(DEFINES_A_FLAG)
  r = subprocess.run([sys.executable, "-c", IMPORT_ALL, "lcm_jax_probe"], capture_output=True, text=True,
                     cwd=REPO, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(tmp_path)))
  assert "'lcm_jax_probe': ['model']" in r.stdout, r.stdout + r.stderr[-2000:]
