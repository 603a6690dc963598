"""The import graph of trainer/ and its cycles, read from the source with `ast` (nothing is imported).

An edge A -> B means that importing A executes B: a module-level `import trainer.x` or `from trainer.x import y`
(in `try`, `if`, `with` and class bodies too, but not under `if TYPE_CHECKING:`; imports inside functions run
later and do not count). `from trainer.x import y` is trainer.x.y where y is a submodule, else trainer.x.
Importing trainer.a.b also executes trainer/a/__init__.py, so A gets an edge to each package on the way, except
A's own enclosing packages, which Python has started before A (`from trainer.a import name` from inside trainer.a
still counts: it needs that package's body).

    python -m tests.import_graph          # the cycles, if any (exit status 1)
    python -m tests.import_graph --graph  # every module and what it imports
    python -m tests.import_graph --lazy   # imports inside functions counted too: the cycles they break
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "trainer"


@dataclass(frozen=True)
class Edge:
    target: str
    path: Path  # the importing file, relative to the repository root
    line: int


def find_modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Module name -> source file, packages under their own name (trainer.data -> trainer/data/__init__.py)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(tree: ast.Module, *, lazy: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported (lazy=True: those in functions too)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not lazy:
                continue  # runs when called
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)  # the body is for type checkers only
            else:  # if, try, with, for, while, class bodies: they run at import
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for clause in [*getattr(node, "handlers", []), *getattr(node, "cases", [])]:
                    visit(clause.body)

    visit(tree.body)
    return found


def is_package(module: str, modules: dict[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def resolve(node: ast.Import | ast.ImportFrom, module: str, modules: dict[str, Path]) -> list[str]:
    """The modules of `module`'s own top-level package that the statement `node` in it names."""
    top = module.split(".")[0]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == top]
    if node.level:  # relative: from the module's package, up level - 1 more
        package = module.split(".") if is_package(module, modules) else module.split(".")[:-1]
        parts = package[: len(package) - (node.level - 1)] + ([node.module] if node.module else [])
        base = ".".join(parts)
    else:
        base = node.module or ""
    if base.split(".")[0] != top:
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def build_graph(root: Path = ROOT, package: str = PACKAGE, *, lazy: bool = False) -> dict[str, list[Edge]]:
    """Module -> the edges out of it, one per imported module and statement (lazy=True: with the imports
    inside functions, which run when the function is first called)."""
    modules = find_modules(root, package)
    graph: dict[str, list[Edge]] = {}
    for module, path in modules.items():
        # Python has started these before `module`: passing through them executes nothing new.
        started = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        edges = []
        for node in module_level_imports(ast.parse(path.read_text(), filename=str(path)), lazy=lazy):
            for target in resolve(node, module, modules):
                parts = target.split(".")
                on_the_way = [".".join(parts[:i]) for i in range(1, len(parts))]
                for name in [*(p for p in on_the_way if p not in started), target]:
                    if name in modules:  # the target itself always: its body is what the import needs
                        edges.append(Edge(name, path.relative_to(root), node.lineno))
        graph[module] = edges
    return graph


def strongly_connected_components(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's algorithm (recursive: a package is far shallower than Python's recursion limit); each
    component sorted, the components in order of their first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in sorted({e.target for e in graph[node]}):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def shortest_cycle(graph: dict[str, list[Edge]], start: str, members: set[str]) -> list[Edge]:
    """The edges of a shortest cycle from `start` back to it within `members` (breadth first)."""
    previous: dict[str, tuple[str, Edge]] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in graph[node]:
                if edge.target not in members or edge.target in previous:
                    continue
                previous[edge.target] = (node, edge)
                if edge.target == start:
                    path, at = [], start
                    while True:
                        node_before, e = previous[at]
                        path.append(e)
                        at = node_before
                        if at == start:
                            return path[::-1]
                following.append(edge.target)
        frontier = following
    return []


def find_cycles(graph: dict[str, list[Edge]]) -> list[tuple[list[str], list[Edge]]]:
    """Each strongly connected component of more than one module (or a module importing itself), with one
    shortest cycle through its first module."""
    found = []
    for component in strongly_connected_components(graph):
        members = set(component)
        if len(component) > 1 or any(e.target == component[0] for e in graph[component[0]]):
            found.append((component, shortest_cycle(graph, component[0], members)))
    return found


def format_cycle(component: list[str], cycle: list[Edge]) -> str:
    start = component[0]
    arrows = " -> ".join([start, *(e.target for e in cycle)])
    where = "\n".join(f"    {e.path}:{e.line} imports {e.target}" for e in cycle)
    members = ""
    if len(component) > len(cycle):  # more modules in the knot than on this shortest way round
        members = f"  (one of the cycles among {len(component)} modules: {', '.join(component)})\n"
    return f"  {arrows}\n{members}{where}"


def format_cycles(cycles: list[tuple[list[str], list[Edge]]]) -> str:
    return "\n".join(format_cycle(component, cycle) for component, cycle in cycles)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.import_graph", description=__doc__.split("\n")[0])
    parser.add_argument("--graph", action="store_true", help="print every module and the modules it imports")
    parser.add_argument("--lazy", action="store_true", help="count the imports inside functions too")
    args = parser.parse_args(argv)
    graph = build_graph(lazy=args.lazy)
    if args.graph:
        for module, edges in graph.items():
            print(f"{module}: {', '.join(sorted({e.target for e in edges})) or '-'}")
    cycles = find_cycles(graph)
    if cycles:
        print(f"{len(cycles)} import cycle(s) in {PACKAGE}/:\n{format_cycles(cycles)}")
        return 1
    print(f"no import cycle in {PACKAGE}/ ({len(graph)} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
