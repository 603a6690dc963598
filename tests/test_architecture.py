"""The package's shape: no import cycle in trainer/, and strategy names compared only in trainer/strategies/."""

import re

import pytest

from tests.import_graph import PACKAGE, ROOT, build_graph, find_cycles, format_cycles

# The acceptance check, as written: grep -rn "strategy.name\|\.name ==" trainer/ (`.` unescaped: any character).
NAME_COMPARISON = re.compile(r"strategy.name|\.name ==")
STRATEGIES = ROOT / PACKAGE / "strategies"


def test_trainer_has_no_import_cycle_even_through_imports_inside_functions():
    # A lazy import only postpones a circle (config -> quant.qat -> config is a circle all the same): count them.
    cycles = find_cycles(build_graph(lazy=True))
    if cycles:
        pytest.fail(
            f"{len(cycles)} import cycle(s) in {PACKAGE}/ (module-level imports and those inside functions; each "
            f"arrow: importing the left module, or calling into it, executes the right one):\n{format_cycles(cycles)}\n"
            "Move what both sides need into a module that imports neither.",
            pytrace=False,
        )


def test_no_strategy_name_comparison_outside_strategies():
    matches = []
    for path in sorted((ROOT / PACKAGE).rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.is_relative_to(STRATEGIES):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if NAME_COMPARISON.search(line):
                matches.append(f"  {path.relative_to(ROOT)}:{number}: {line.strip()}")
    if matches:
        pytest.fail(
            f'{len(matches)} line(s) outside {PACKAGE}/strategies/ match grep "strategy.name\\|\\.name ==":\n'
            + "\n".join(matches)
            + "\nWhat differs between strategies belongs to the strategy classes; other `.name ==` tests "
            "(paths, precision, prune and quant names) match the same grep and need another spelling.",
            pytrace=False,
        )


def test_the_cycle_check_follows_package_inits_and_skips_lazy_and_type_checking_imports(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.sub.b import thing\n",  # runs pkg/sub/__init__.py first
        "pkg/sub/__init__.py": "try:\n    from pkg import a\nexcept ImportError:\n    a = None\n",
        "pkg/sub/b.py": "from pkg.sub import c\nthing = 1\n",  # a sibling: pkg.sub has started already
        "pkg/sub/c.py": "",
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n",
        "pkg/e.py": "import pkg.d\n\ndef later():\n    from pkg import e\n",
        "pkg/f.py": "from pkg.f import g\ng = 1\n",  # itself
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = build_graph(tmp_path, "pkg")
    assert {e.target for e in graph["pkg.a"]} == {"pkg.sub", "pkg.sub.b"}
    assert {e.target for e in graph["pkg.sub.b"]} == {"pkg.sub.c"}
    cycles = find_cycles(graph)
    assert [component for component, _ in cycles] == [["pkg.a", "pkg.sub"], ["pkg.f"]]
    text = format_cycles(cycles)
    assert "pkg.a -> pkg.sub -> pkg.a" in text and "pkg/sub/__init__.py:2 imports pkg.a" in text
    assert "pkg.f -> pkg.f" in text
    assert len(find_cycles(build_graph(tmp_path, "pkg", lazy=True))) == 3  # pkg.e's import in a function
