"""The package's structure, read from the source (nothing is imported): no import
cycle between modules, no oversized file, no knowledge of the diffusers UNet outside
the modules whose job it is, one compress pipeline."""

from __future__ import annotations

import ast
import io
import tokenize
from fnmatch import fnmatch
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "layermerge"
MAX_LINES = 800


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import statement, at any depth (functions, classes, try/except), except
    the body of ``if TYPE_CHECKING:``: those never run, so they cannot make an import
    cycle at run time (annotations are strings under ``from __future__ import
    annotations``)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, dict[str, int]]:
    """Module -> {imported module of this package: line of the first such import}.

    ``import a.b`` is an edge to ``a.b``; ``from a import b`` is an edge to ``a.b``
    when that is a module, else to ``a``. Relative imports are resolved against the
    importing module's package. Parent packages that Python imports on the way are
    not edges (every module would otherwise depend on ``layermerge/__init__``)."""
    files = {_module_name(p): p for p in _files()}

    def known(name: str) -> str | None:
        # the longest prefix of ``name`` that is a module of the package
        parts = name.split(".")
        while parts:
            if ".".join(parts) in files:
                return ".".join(parts)
            parts.pop()
        return None

    graph: dict[str, dict[str, int]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    pkg = ".".join(base + ([node.module] if node.module else []))
                else:
                    pkg = node.module or ""
                targets = [
                    f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in files else pkg for a in node.names
                ]
            for t in targets:
                if t == "layermerge" or t.startswith("layermerge."):
                    target = known(t)
                    if target is not None and target != mod:
                        edges.setdefault(target, node.lineno)
        graph[mod] = edges
    return graph


def tangles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm):
    sets of modules that all import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [sorted(c) for c in components]


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """A shortest cycle (as a closed path) through the first module of each tangle."""
    cycles = []
    for comp in tangles(graph):
        members = set(comp)
        start = min(comp)
        # breadth-first from start back to start inside the component: a shortest cycle
        prev: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        found = v
                        break
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v != start:
            path.append(v)
            v = prev[v]
        path.append(start)
        cycles.append([start, *reversed(path[1:-1]), start])
    return cycles


def test_no_import_cycle():
    graph = import_graph()
    assert "layermerge.chain" in graph and graph["layermerge.chain"] == {}
    cycles = find_cycles(graph)
    lines = []
    for cyc, comp in zip(cycles, tangles(graph)):
        steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cyc, cyc[1:])]
        lines.append("cycle: " + "; ".join(steps))
        lines.append(f"  ({len(comp)} modules import each other: {', '.join(comp)})")
    assert not cycles, f"{len(cycles)} import cycle(s) between modules:\n" + "\n".join(lines)


def test_find_cycles_reports_a_closed_path():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_source_file_over_800_lines():
    long = {
        str(p.relative_to(SRC)): n
        for p in _files()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


# The diffusers UNet is known only to its family's modules, the family registry, the
# model loader and the diffusion task (its loss, FID and sampling). Paths relative to
# the package; the CLI's and the pipeline's modules are core whatever their names.
UNET_ALLOWED = (
    "families/diffusers_unet*.py",
    "families/diffusers_unet*/*",
    "families/__init__.py",
    "families/registry.py",
    "models.py",
    "diffusion.py",
    "fid.py",
    "sampling.py",
    "zoo.py",
)
UNET_WORDS = (
    "is_unet",
    "UNet2DModel",
    "UNetForward",
    "layermerge_adapter",
    '"unet"',
    "'unet'",
    "from .unet",
    "from ..unet",
    "layermerge.unet",
    "diffusers_unet",
)


def _code_lines(source: str) -> list[tuple[int, str]]:
    """The source's lines with comments and docstrings blanked out: prose may name the
    UNet, code may not."""
    tree = ast.parse(source)
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docstrings.add(first.lineno)
    chars = [list(line) for line in source.splitlines()]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        prose = tok.type == tokenize.COMMENT or (
            tok.type == tokenize.STRING and tok.start[0] in docstrings
        )
        if not prose:
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for r in range(r0, r1 + 1):
            row = chars[r - 1]
            for c in range(c0 if r == r0 else 0, c1 if r == r1 else len(row)):
                row[c] = " "
    return [(i, "".join(row)) for i, row in enumerate(chars, 1)]


UNET_MODULES = ("layermerge.unet", "layermerge.families.diffusers_unet")


def test_core_modules_do_not_know_the_unet():
    graph = import_graph()
    found: list[str] = []
    for path in _files():
        rel = path.relative_to(PACKAGE).as_posix()
        if any(fnmatch(rel, pat) for pat in UNET_ALLOWED):
            continue
        for n, line in _code_lines(path.read_text()):
            found += [f"{rel}:{n}: {word}" for word in UNET_WORDS if word in line]
        # imports of the UNet family's modules however written (``from . import unet``)
        for target, n in graph[_module_name(path)].items():
            if any(target == m or target.startswith(m) for m in UNET_MODULES):
                found.append(f"{rel}:{n}: imports {target}")
    assert not found, "UNet-specific code in core modules:\n" + "\n".join(found)


def test_one_compress_pipeline():
    assert not (PACKAGE / "compress_diffusion.py").exists()
