"""The import direction of the house (docs/design.md, "Layers").

Each module belongs to one layer; a module may import modules of its own layer or of a
layer below, never above. Imports under ``if TYPE_CHECKING:`` are for annotations only and
are not counted. Only the exporters module and the configuration modules import the
OpenTelemetry SDK (or the exporters module, which loads it). The checks read the source
with :mod:`ast`, so a forbidden import fails here even on a path no test executes.
"""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "rag_instrument"

#: Bottom to top. A new module must be placed here (the test says so when it is not).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "attributes",
            "_utils",
            "_registry",
            "_settings",
            "_sanitize",
            "_errors",
            "_pools",
            "_steps",
            "_sweep",
        ),
    ),
    ("runtime", ("_runtime", "_context", "_breakdown")),
    ("logs and tracing", ("logs", "exporters", "_leaf", "_sending", "_otlp", "_metrics")),
    (
        "stages",
        (
            "stages", "_genai", "retry", "llm", "cache", "cache.*", "vector", "_operation",
            "_stagehooks", "_resources", "eventloop", "_profiler", "profiling",
        ),
    ),
    ("setup", ("_config",)),
    (
        "integrations",
        (
            "db",
            "db.*",
            "integrations",
            "integrations.*",
            "web",
            "propagation",
            "testing",
            "pytest_plugin",
        ),
    ),
    ("package", ("",)),  # rag_instrument/__init__.py: re-exports everything
    ("analysis", ("analysis", "analysis.*")),  # reads logs offline; the CLI shows it
    ("cli", ("cli", "cli.*")),
)

#: The only modules that may import the OpenTelemetry SDK, or ``exporters`` and its private
#: part ``_leaf`` (which load it).
SDK_MODULES = frozenset(
    {"exporters", "_leaf", "_sending", "_otlp", "_metrics", "_config", "_settings"}
)
SDK_LOADERS = frozenset({"exporters", "_leaf", "_sending", "_otlp", "_metrics"})


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC / PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The index of ``module``'s layer (module names relative to the package)."""
    for index, (_name, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return index
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _resolve(module: str, known: set[str]) -> str:
    """``rag_instrument.x.y`` -> ``x.y`` (or its nearest known package)."""
    rel = module.removeprefix(PACKAGE).lstrip(".")
    while rel and rel not in known:
        rel = rel.rpartition(".")[0]
    return rel


def imports_of(module: str, source: str, known: set[str]) -> list[tuple[str, int]]:
    """The modules ``module`` imports at run time: (name, line); SDK imports as ``"<sdk>"``."""
    result: list[tuple[str, int]] = []
    package_parts = module.split(".") if module else []
    is_package = module == "" or (module in MODULES and MODULES[module].name == "__init__.py")
    for node in _runtime_imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package_parts if is_package else package_parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join([PACKAGE, *anchor, *([base] if base else [])])
            # ``from pkg import name``: the submodule ``pkg.name`` if there is one, else ``pkg``.
            rel_base = base.removeprefix(PACKAGE).lstrip(".")
            targets = [
                f"{base}.{alias.name}"
                if ".".join(filter(None, [rel_base, alias.name])) in known
                else base
                for alias in node.names
            ]
        for target in targets:
            if target.startswith("opentelemetry.sdk"):
                result.append(("<sdk>", node.lineno))
            elif target == PACKAGE or target.startswith(PACKAGE + "."):
                result.append((_resolve(target, known), node.lineno))
    return result


def violations(module: str, source: str, known: set[str] | None = None) -> list[str]:
    """Every import of ``module`` that goes up a layer or reaches the SDK where it may not."""
    known = set(MODULES) if known is None else known
    own = layer_of(module)
    if own is None:
        return [f"{module or PACKAGE}: not in any layer of tests/test_layers.py LAYERS"]
    found = []
    for target, line in imports_of(module, source, known):
        if target == "<sdk>" or target in SDK_LOADERS:
            if module not in SDK_MODULES:
                what = "the OpenTelemetry SDK" if target == "<sdk>" else f"{target} (the SDK)"
                found.append(f"{module}:{line} imports {what}")
            continue
        if target == module:
            continue
        theirs = layer_of(target)
        if theirs is not None and theirs > own:
            found.append(
                f"{module}:{line} ({LAYERS[own][0]}) imports {target or PACKAGE} "
                f"({LAYERS[theirs][0]}), a layer above"
            )
    return found


@pytest.mark.parametrize("module", sorted(MODULES), ids=lambda m: m or PACKAGE)
def test_imports_go_downhill(module: str) -> None:
    assert violations(module, MODULES[module].read_text()) == []


def find_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import circles in ``graph`` (module -> the modules it imports), each as a path."""
    circles: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for target in sorted(graph.get(node, set())):
            if target in path:
                circles.append([*path[path.index(target) :], target])
            elif target not in done:
                visit(target, [*path, target])
        done.add(node)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return circles


def import_graph() -> dict[str, set[str]]:
    known = set(MODULES)
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets = {t for t, _ in imports_of(module, path.read_text(), known) if t in known}
        # A package importing its own submodules (``db/__init__`` re-exporting) is no circle,
        # and the package root is imported before any of its modules anyway.
        graph[module] = {t for t in targets if t and t != module and not t.startswith(module + ".")}
    graph[""] = set()
    return graph


def test_no_import_circles() -> None:
    graph = import_graph()
    assert graph["_config"] >= {"_runtime", "logs"}  # the graph is really built
    assert find_circles(graph) == []


def test_a_circle_is_found() -> None:
    # What the house had before: _config -> logs -> _config, and _context -> _config (late).
    graph = {"_config": {"logs", "exporters"}, "logs": {"_config"}, "exporters": set()}
    assert find_circles(graph) == [["_config", "logs", "_config"]]


# --- the checks fail when a forbidden import is added ------------------------------------------


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("_runtime", "from rag_instrument import logs\n", "_runtime:1 (runtime) imports logs"),
        ("_runtime", "def f():\n    from rag_instrument.stages import stage\n", "imports stages"),
        ("_context", "from rag_instrument import _config\n", "imports _config (setup)"),
        ("stages", "import rag_instrument._config\n", "stages:1 (stages) imports _config"),
        ("logs", "from rag_instrument.db import _sql\n", "imports db._sql (integrations)"),
        ("_sanitize", "from rag_instrument.db._sql import analyze\n", "imports db._sql"),
        ("db._listeners", "from rag_instrument.exporters import start_leaf_span\n", "exporters"),
        ("stages", "from opentelemetry.sdk.trace import Span\n", "the OpenTelemetry SDK"),
        ("_genai", "from rag_instrument._leaf import LeafSpan\n", "_leaf (the SDK)"),
        ("cache.keys", "from rag_instrument import configure\n", "imports rag_instrument"),
        ("brand_new", "x = 1\n", "not in any layer"),
    ],
)
def test_a_forbidden_import_is_reported(module: str, source: str, expected: str) -> None:
    found = violations(module, source, set(MODULES) | {"cache.keys", "brand_new"})
    assert any(expected in message for message in found), found


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("stages", "from rag_instrument import _runtime, logs\n"),
        ("db._listeners", "from rag_instrument._runtime import get_runtime\n"),
        (
            "_runtime",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import rag_instrument.logs\n",
        ),
        ("_config", "from opentelemetry.sdk.trace import TracerProvider\n"),
        ("cli.demo", "import rag_instrument as ri\n"),
    ],
)
def test_allowed_imports_are_not_reported(module: str, source: str) -> None:
    assert violations(module, source) == []


def test_importing_the_database_integration_does_not_load_the_sdk() -> None:
    pytest.importorskip("sqlalchemy")
    code = "import sys, rag_instrument.db\nprint('opentelemetry.sdk' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def _installs_a_runtime(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        return (
            node.attr == "install"
            and isinstance(node.value, ast.Name)
            and (node.value.id == "_runtime")
        )
    if isinstance(node, ast.ImportFrom):
        return node.module == "rag_instrument._runtime" and any(
            alias.name == "install" for alias in node.names
        )
    return False


def test_only_the_configuration_module_installs_a_runtime() -> None:
    # One owner writes the runtime; everybody else reads it through get_runtime().
    writers = {
        module
        for module, path in MODULES.items()
        if any(_installs_a_runtime(node) for node in ast.walk(ast.parse(path.read_text())))
    }
    assert writers == {"_config"}
