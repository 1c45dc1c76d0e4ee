"""The layering of the packages: the core imports no project, projects import each other
only where the layout allows (fourm_jax -> tokenizers_jax), and no module imports itself
back through a chain (every import statement counts, top-level or inside a function)."""
import ast
import pathlib

from conftest import ROOT

PACKAGES = ("pretrain_jax", "aimjax", "fourm_jax", "tokenizers_jax")
# importer package -> packages it must not import
FORBIDDEN = {"pretrain_jax": {"aimjax", "fourm_jax", "tokenizers_jax"},
             "aimjax": {"fourm_jax", "tokenizers_jax"},
             "tokenizers_jax": {"aimjax", "fourm_jax"},
             "fourm_jax": {"aimjax"}}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for path in (pathlib.Path(ROOT) / package).rglob("*.py"):
      parts = path.relative_to(ROOT).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _resolve(name: str, modules) -> str | None:
  """The project module an imported name lives in (its longest existing prefix)."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in modules:
      return ".".join(parts[:n])
  return None


def _imports(module: str, path: pathlib.Path, modules) -> set[str]:
  """Project modules that `module` imports anywhere in its file."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      names = [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    out |= {m for m in (_resolve(n, modules) for n in names) if m and m != module}
  return out


def _graph():
  modules = _modules()
  return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_the_graph_sees_imports_at_any_depth():
  graph = _graph()
  assert "aimjax.inference" in graph["aimjax.backbone"]              # top level
  assert "fourm_jax.load" in graph["fourm_jax.backbone"]             # inside a function
  assert "pretrain_jax.data.edges" in graph["tokenizers_jax.train"]  # inside a method
  assert "aimjax.backbone" in graph["aimjax"]                        # the lazy package attribute


def test_the_core_imports_no_project_and_projects_only_what_the_layout_allows():
  bad = sorted(f"{m} imports {t}" for m, targets in _graph().items() for t in targets
               if t.split(".")[0] in FORBIDDEN[m.split(".")[0]])
  assert bad == []


def test_no_import_cycles():
  graph = _graph()
  cycles, state = [], {}

  def visit(m, stack):
    state[m] = "open"
    for t in sorted(graph[m]):
      if state.get(t) == "open":
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t, stack + [t])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert cycles == []
