"""The package's shape: every module imports, no module imports one above its layer, no import cycles.

Layers, lowest first: ``kernels`` (GPU kernels, import nothing of the package), ``model`` and
``cache`` (side by side: the network and the per-stream caches never import each other; both call
kernels), ``graph`` (the exported step's state layout and STAC ops, shared by graph export and the
exported-graph runtimes), ``engine`` (streams, steps, the runtime interface and its runtimes),
``serving`` (Triton glue). The
scan reads every import statement, including those inside functions and ``if TYPE_CHECKING:``
blocks: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import stac_backend

PACKAGE_DIR = Path(stac_backend.__file__).resolve().parent
ROOT = PACKAGE_DIR.name  # "stac_backend"

# What each layer may import of the package, besides its own modules.
ALLOWED = {
    "kernels": set(),
    "model": {"kernels"},
    "cache": {"kernels"},
    "graph": {"kernels", "model", "cache"},
    "engine": {"kernels", "model", "cache", "graph"},
    "serving": {"kernels", "model", "cache", "graph", "engine"},
}
# Layers whose every package import is listed above; serving may also use the modules around the
# core (export runtimes, data), which sit beside it rather than below.
CLOSED_LAYERS = {"kernels", "model", "cache", "graph", "engine"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = (ROOT,) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t == ROOT or t.startswith(ROOT + "."))
    found.discard(name)
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_layers_import_only_the_layers_below_them():
    problems = []
    for module, targets in sorted(import_graph().items()):
        layer = layer_of(module)
        if layer is None:
            continue
        for target in sorted(targets):
            target_layer = layer_of(target)
            if target_layer == layer or target_layer in ALLOWED[layer]:
                continue
            if target_layer is None and layer not in CLOSED_LAYERS:
                continue
            problems.append(f"{module} ({layer}) imports {target} ({target_layer or 'outside the layers'})")
    assert not problems, "layer rule broken:\n" + "\n".join(problems)


def test_no_import_cycles():
    graph = import_graph()
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph[module]):
            if target in path:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


def test_every_module_imports_in_a_fresh_interpreter():
    """One new interpreter imports every module; a module whose optional third-party dependency is
    not installed here (tensorrt, triton's python backend, ...) is skipped, any other error fails."""
    script = f"""
import importlib, sys
failed = []
for name in {sorted(m for m in module_files() if not m.endswith(".__main__"))!r}:  # __main__ runs a command
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == {ROOT!r}:
            failed.append(f"{{name}}: {{exc!r}}")
    except Exception as exc:
        failed.append(f"{{name}}: {{exc!r}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
