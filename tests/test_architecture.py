"""The import structure of migshark, read from the source with `ast`.

Layers: `dissectors` (the wire formats) imports nothing of ours but itself;
`analyzer` imports dissectors and never `tui`, except in the CLI's command handlers
(analyzer/cli.py's cmd_* functions, the composition root that wires the TUI in); `tui`
may import both. No module import graph cycle, counting imports inside functions too:
a function-level import is a cycle postponed, not removed. Everything is imported as
`migshark.*`, never as the bare folder names a checkout happens to have on sys.path.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PRODUCT_FOLDERS = ("analyzer", "dissectors", "tui")
BARE_NAMES = frozenset(PRODUCT_FOLDERS)
# The composition root: only these functions of this module may import the TUI.
COMPOSITION_ROOT = "migshark.analyzer.cli"
HANDLER_PREFIX = "cmd_"


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted module name as written (after resolving relative imports)
    names: tuple[str, ...]  # for `from X import a, b`: a, b
    line: int
    in_function: str | None  # the enclosing top-level function, if any
    type_only: bool = False  # under `if TYPE_CHECKING:`


def module_name(path: Path, root: Path) -> str:
    """migshark.analyzer.capture.tcp for analyzer/capture/tcp.py (the installed name)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] == "migshark":
        parts = parts[1:]
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["migshark", *parts])


def product_files(root: Path) -> list[Path]:
    files = [p for folder in PRODUCT_FOLDERS for p in sorted((root / folder).rglob("*.py"))]
    # migshark/ holds links to the folders: only its own files count
    files += sorted(p for p in (root / "migshark").glob("*.py") if not p.is_symlink())
    return files


def imports_of(source: str, importer: str, is_package: bool) -> Iterator[Import]:
    tree = ast.parse(source)
    package = importer if is_package else importer.rpartition(".")[0]

    def walk(node: ast.AST, function: str | None, type_only: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            enclosing = function
            if function is None and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                enclosing = child.name
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                yield from walk(ast.Module(body=child.body, type_ignores=[]), enclosing, True)
                yield from walk(ast.Module(body=child.orelse, type_ignores=[]), enclosing,
                                type_only)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(importer, alias.name, (), child.lineno, enclosing, type_only)
            elif isinstance(child, ast.ImportFrom):
                target = child.module or ""
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join([*base, target] if target else base)
                names = tuple(alias.name for alias in child.names)
                yield Import(importer, target, names, child.lineno, enclosing, type_only)
            yield from walk(child, enclosing, type_only)

    yield from walk(tree, None, False)


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def all_imports(root: Path) -> list[Import]:
    found: list[Import] = []
    for path in product_files(root):
        found += imports_of(path.read_text(), module_name(path, root),
                            path.name == "__init__.py")
    return found


def graph_of(imports: list[Import], modules: set[str], *, handlers: bool = False
             ) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports at run time. `from pkg import mod` is an
    edge to pkg.mod when that is a module, else to pkg. Left out: the CLI handlers, and
    imports only for type checking (annotations name each other without importing)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for imp in imports:
        if (is_handler_import(imp) and not handlers) or imp.type_only:
            continue
        targets = [f"{imp.target}.{name}" for name in imp.names
                   if f"{imp.target}.{name}" in modules]
        if len(targets) < len(imp.names) or not imp.names:
            if imp.target in modules:
                targets.append(imp.target)
        for target in targets:
            if target != imp.importer:
                graph[imp.importer].add(target)
    return graph


def is_handler_import(imp: Import) -> bool:
    return (imp.importer == COMPOSITION_ROOT and imp.in_function is not None
            and imp.in_function.startswith(HANDLER_PREFIX))


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; the components with more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "migshark":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in PRODUCT_FOLDERS else "migshark"


def direction_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        source, target = layer_of(imp.importer), layer_of(imp.target)
        if target is None:
            continue
        where = f"{imp.importer}:{imp.line} imports {imp.target}"
        if source == "dissectors" and target != "dissectors":
            bad.append(f"{where} (dissectors imports nothing of ours but itself)")
        elif source == "analyzer" and target == "tui" and not is_handler_import(imp):
            bad.append(f"{where} (analyzer imports tui only in the CLI's cmd_* handlers)")
    return bad


def bare_imports(source: str) -> list[int]:
    """Lines that import the checkout folders by their bare names."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            if any(alias.name.split(".")[0] in BARE_NAMES for alias in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in BARE_NAMES:
                lines.append(node.lineno)
    return lines


def test_module_names() -> None:
    assert module_name(REPO_ROOT / "analyzer/capture/tcp.py", REPO_ROOT) == \
        "migshark.analyzer.capture.tcp"
    assert module_name(REPO_ROOT / "tui/__init__.py", REPO_ROOT) == "migshark.tui"
    assert module_name(REPO_ROOT / "migshark/__main__.py", REPO_ROOT) == "migshark.__main__"


def test_the_checks_see_cycles_wrong_directions_and_relative_imports() -> None:
    """The checker itself, on planted sources: otherwise a parser that finds nothing
    would pass every test below."""
    planted = {
        "migshark.analyzer.a": "from migshark.analyzer import b\n",
        "migshark.analyzer.b": "def later() -> None:\n    from . import a\n",
        "migshark.analyzer.cli": ("def cmd_tui() -> None:\n    from migshark.tui import app\n"
                                  "def helper() -> None:\n    import migshark.tui.app\n"),
        "migshark.tui.app": "from migshark.analyzer.cli import helper\n",
        "migshark.dissectors.x": "from migshark.analyzer.records import Record\n",
        "migshark.analyzer.records": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                      "    from migshark.dissectors import x\n"),
    }
    imports = [imp for name, source in planted.items()
               for imp in imports_of(source, name, is_package=False)]
    relative = next(imp for imp in imports if imp.importer == "migshark.analyzer.b")
    assert (relative.target, relative.names, relative.in_function) == (
        "migshark.analyzer", ("a",), "later")
    graph = graph_of(imports, set(planted))
    assert graph["migshark.analyzer.b"] == {"migshark.analyzer.a"}
    typed = [imp for imp in imports if imp.importer == "migshark.analyzer.records"]
    assert [imp.type_only for imp in typed] == [False, True]
    assert graph["migshark.analyzer.records"] == set()  # no run-time cycle with x
    assert "migshark.tui.app" in graph["migshark.analyzer.cli"]  # helper(), not a handler
    assert strongly_connected(graph) == [
        ["migshark.analyzer.a", "migshark.analyzer.b"],
        ["migshark.analyzer.cli", "migshark.tui.app"]]
    bad = direction_violations(imports)
    assert len(bad) == 2
    assert bad[0].startswith("migshark.analyzer.cli:4 imports migshark.tui.app")
    assert bad[1].startswith("migshark.dissectors.x:1 imports migshark.analyzer.records")
    assert bare_imports("import analyzer.cli\nfrom tui import app\nfrom .tui import x\n"
                        "import migshark.tui\nfrom dissectors.grammar import Q\n") == [1, 2, 5]


def test_every_product_module_is_seen() -> None:
    names = {module_name(p, REPO_ROOT) for p in product_files(REPO_ROOT)}
    for expected in ("migshark", "migshark.__main__", "migshark.analyzer.cli",
                     "migshark.analyzer.report", "migshark.analyzer.connections",
                     "migshark.analyzer.capture.tcp", "migshark.dissectors.grammar",
                     "migshark.tui.app"):
        assert expected in names
    assert len(all_imports(REPO_ROOT)) > 100


def test_layers_import_in_one_direction() -> None:
    assert direction_violations(all_imports(REPO_ROOT)) == []


def test_no_import_cycle_among_product_modules() -> None:
    modules = {module_name(p, REPO_ROOT) for p in product_files(REPO_ROOT)}
    graph = graph_of(all_imports(REPO_ROOT), modules)
    assert sum(len(targets) for targets in graph.values()) > 50, "the graph is not empty"
    assert strongly_connected(graph) == []
    # Stricter than the rule: even the composition root's handlers close no circle
    # (before analyzer/report.py, cli, live, proxy and four tui modules did).
    assert strongly_connected(graph_of(all_imports(REPO_ROOT), modules, handlers=True)) == []


def test_everything_imports_migshark_not_the_bare_folders() -> None:
    files = product_files(REPO_ROOT) + sorted((REPO_ROOT / "tests").rglob("*.py"))
    bad = [f"{path.relative_to(REPO_ROOT)}:{line}" for path in files
           for line in bare_imports(path.read_text())]
    assert bad == []


def _test_module(name: str) -> bool:
    last = name.split(".")[-1]
    return last.startswith("test_") or last == "conftest"


def test_no_test_module_imports_another_test_module() -> None:
    """Test modules (test_*.py, conftest.py) share helpers through a helpers package,
    never by importing each other."""
    bad = []
    for path in sorted((REPO_ROOT / "tests").rglob("*.py")):
        importer = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
        for imp in imports_of(path.read_text(), importer, path.name == "__init__.py"):
            targets = [imp.target, *(f"{imp.target}.{n}" for n in imp.names)]
            if any(_test_module(t) for t in targets):
                bad.append(f"{path.relative_to(REPO_ROOT)}:{imp.line} imports {imp.target}")
    assert bad == []
