"""The shape of the code: layers that only point down, no import circles, function-level imports
only to defer a heavy dependency, and functions a reader can hold.

The import graph is read from the source with ``ast`` (imports at module level and inside
functions, relative ones resolved), so a circle is found even where a function-level import keeps
it importable. Each failure names the file, the line and the import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mechinterp", "probes")
MAX_FUNCTION_LINES = 60

#: The layers, lowest first: a module may import its own layer or a lower one (as long as no
#: circle forms). Each entry is a module name or a package prefix; the longest match wins.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("mechinterp.errors", "mechinterp.paths", "mechinterp.progress", "mechinterp.plotting"),
    ("mechinterp.store",),
    ("mechinterp.models",),
    ("mechinterp.data",),
    ("mechinterp.evals", "mechinterp.analysis"),
    ("mechinterp.training",),
    ("mechinterp.core",),
    ("probes",),
    ("mechinterp.study",),
    ("mechinterp.cli", "mechinterp.__main__"),
    ("mechinterp", "mechinterp.pytest_plugin", "mechinterp.planted", "probes.claims"),
)

#: Third-party packages slow enough to import that a function may defer them. A function-level
#: import of anything else (the product's own modules included) carries a comment on its line,
#: or on the line above its run of imports, naming which of these it defers.
HEAVY = ("torch", "transformers", "transformer_lens", "nnsight", "trl", "datasets", "accelerate",
         "matplotlib", "pandas", "pyarrow", "scipy", "submitit", "gguf", "safetensors",
         "tensorboard", "torch.utils.tensorboard", "wandb", "trackio", "peft", "lm_eval",
         "ipywidgets", "IPython", "nbclient", "nbformat", "deepspeed", "bitsandbytes", "rich",
         "vllm", "huggingface_hub")

#: Modules that run a program when imported (not imported by the check below).
ENTRY_SCRIPTS = ("mechinterp.__main__", "mechinterp.cli.__main__")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported product module
    line: int
    in_function: bool
    text: str  # the import as written


def product_modules() -> dict[str, Path]:
    """``{module name: file}`` for every module of the product packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _absolute(module: str, path: Path, level: int, name: str | None) -> str:
    """The absolute module a ``from ... import`` names (``level`` dots relative to ``module``)."""
    if level == 0:
        return name or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The product module ``name`` lives in (itself, or its longest prefix that is a module)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def _function_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes that sit inside a function body."""
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return inside


def _targets(node: ast.AST, module: str, path: Path) -> list[str]:
    """The absolute names an import statement binds (for ``from X import a``: ``X.a`` and ``X``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = _absolute(module, path, node.level, node.module)
    return [f"{base}.{a.name}" for a in node.names]


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a product module by ``module`` (module level and inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    inside = _function_nodes(tree)
    lines = path.read_text().splitlines()
    found = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for name in _targets(node, module, path):
            target = _owner(name, modules)
            if target is not None and target != module:
                found[target, node.lineno] = Import(module, target, node.lineno,
                                                    id(node) in inside,
                                                    lines[node.lineno - 1].strip())
    return list(found.values())


def import_graph() -> tuple[dict[str, set[str]], list[Import]]:
    modules = product_modules()
    edges = [imp for m, p in modules.items() for imp in imports_of(m, p, modules)]
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in edges:
        graph[imp.source].add(imp.target)
    return graph, edges


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layer_of(module: str) -> int:
    best, layer = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), i
    return layer


def _file(module: str) -> str:
    return str(product_modules()[module].relative_to(ROOT))


def dependency_order(graph: dict[str, set[str]]) -> list[str]:
    """Modules with what they import first (a module in a circle comes after what it can)."""
    order: list[str] = []
    done: set[str] = set()

    def visit(node: str, path: set[str]) -> None:
        if node in done or node in path:
            return
        path.add(node)
        for child in sorted(graph[node]):
            visit(child, path)
        path.discard(node)
        done.add(node)
        order.append(node)

    for node in sorted(graph):
        visit(node, set())
    return order


def test_no_import_circles():
    graph, edges = import_graph()
    found = circles(graph)
    report = []
    for members in found:
        inner = [e for e in edges if e.source in members and e.target in members]
        report.append(f"circle of {len(members)} modules: "
                      + "; ".join(f"{_file(e.source)}:{e.line} {e.text}" for e in inner))
    assert not found, "\n".join(report)


@pytest.mark.slow
def test_every_module_imports_in_dependency_order():
    """Each module, leaves first, in one fresh interpreter: a circle that the graph misses (an
    import by name at run time) shows here as a partly initialised module."""
    graph, _ = import_graph()
    order = [m for m in dependency_order(graph) if m not in ENTRY_SCRIPTS]
    code = ("import importlib, sys\nfor name in sys.argv[1:]:\n    try:\n"
            "        importlib.import_module(name)\n    except Exception as exc:\n"
            "        sys.exit(f'{name}: {type(exc).__name__}: {exc}')\n")
    done = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True,
                          cwd=ROOT, env={**__import__("os").environ, "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_layers_only_point_down():
    _, edges = import_graph()
    unplaced = sorted({e.source for e in edges if layer_of(e.source) < 0})
    assert not unplaced, f"modules in no layer: {unplaced}"
    up = [f"{_file(e.source)}:{e.line} {e.text} (layer {layer_of(e.source)} imports "
          f"{e.target}, layer {layer_of(e.target)})"
          for e in edges if layer_of(e.target) > layer_of(e.source)]
    assert not up, "imports that point up a layer:\n" + "\n".join(up)


def _heavy(name: str) -> bool:
    return name.split(".")[0] in {h.split(".")[0] for h in HEAVY}


def _names_heavy(comment: str) -> bool:
    words = comment.replace(",", " ").replace("/", " ").replace(";", " ").split()
    return any(_heavy(w.strip("()`'\".:")) for w in words)


def _comment_above(lines: list[str], lineno: int) -> str:
    """The comment line just above the run of import lines that ``lineno`` belongs to."""
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith(("from ", "import ")):
        i -= 1
    above = lines[i].strip() if i >= 0 else ""
    return above[1:] if above.startswith("#") else ""


def function_level_imports() -> list[tuple[Path, int, str, bool]]:
    """``(file, line, import, justified)`` for every import inside a product function."""
    found = []
    for module, path in product_modules().items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text, str(path))
        inside = _function_nodes(tree)
        for node in ast.walk(tree):
            if id(node) not in inside:
                continue
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [_absolute(module, path, node.level, node.module)])
            line = lines[node.lineno - 1]
            comment = line.partition("#")[2] + " " + _comment_above(lines, node.lineno)
            justified = all(_heavy(n) for n in names) or _names_heavy(comment)
            found.append((path, node.lineno, line.strip(), justified))
    return found


def test_function_level_imports_defer_a_heavy_dependency():
    bad = [f"{p.relative_to(ROOT)}:{n} {text}" for p, n, text, ok in function_level_imports()
           if not ok]
    assert not bad, ("function-level imports that defer no heavy dependency (move them to the "
                     "top, or name the dependency in a comment):\n" + "\n".join(bad))


def long_functions() -> list[str]:
    out = []
    for path in product_modules().values():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_longer_than_a_screen():
    offenders = long_functions()
    assert not offenders, (f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders))


def test_the_graph_sees_relative_and_function_level_imports(tmp_path):
    """The checks above are only as good as the graph: a hand-made package with a circle closed
    by a function-level relative import is found, with its files."""
    modules = {"pkg": tmp_path / "pkg" / "__init__.py", "pkg.a": tmp_path / "pkg" / "a.py",
               "pkg.sub": tmp_path / "pkg" / "sub" / "__init__.py",
               "pkg.sub.b": tmp_path / "pkg" / "sub" / "b.py"}
    for p in modules.values():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")
    modules["pkg.a"].write_text("from .sub import b\n")
    modules["pkg.sub.b"].write_text("def f():\n    from ..a import x  # torch\n    return x\n")
    graph = {m: {i.target for i in imports_of(m, p, modules)} for m, p in modules.items()}
    assert graph == {"pkg": set(), "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(),
                     "pkg.sub.b": {"pkg.a"}}
    assert circles(graph) == [["pkg.a", "pkg.sub.b"]]
    assert dependency_order({"x": {"y"}, "y": set()}) == ["y", "x"]
