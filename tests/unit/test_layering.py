"""The package's one-way layering, read from the source (ast; nothing is imported).

index/ (control plane) -> stdlib only; storage/ (bytes) -> not index, transfer, tiers or above;
transfer/ (copies) -> not tiers or above; tiers/ (the scheduler-side stack) -> not the adapters;
config.py -> no plane at all; vLLM and Dynamo only in the adapters (integration/) and the tooling
(devtools/, demo/); no import cycle between modules; no runtime module computes the checkout's path.
Imports under `if TYPE_CHECKING:` are annotations, not dependencies: they count for the plane rules
(a plane must not even name a higher one's types) but not for cycles.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "dynamo_flexkv"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE
TOOLING = ("devtools", "demo")
ADAPTERS = ("integration", *TOOLING)

# plane -> planes (first component under the package) it must not import
FORBIDDEN = {
    "storage": {"index", "transfer", "tiers", "integration", *TOOLING},
    "transfer": {"tiers", "integration", *TOOLING},
    "tiers": {"integration", *TOOLING},
}
CONFIG_MODULES = {"config", "config_sources"}
PLANES = {"index", "storage", "transfer", "tiers", "integration", *TOOLING}
ENGINE_PACKAGES = {"vllm", "dynamo"}


@dataclass(frozen=True)
class Import:
    target: str  # absolute module name
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports_of(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                for inner in child.body:
                    visit_one(inner, True)
                for inner in child.orelse:
                    visit_one(inner, type_only)
            else:
                visit_one(child, type_only)

    def visit_one(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno, type_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import submodule` depends on the submodule when there is one
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                found.append(Import(candidate if _is_module(candidate) else module, node.lineno, type_only))
        visit(node, type_only)

    visit(tree, False)
    return found


def _is_module(name: str) -> bool:
    if not name.startswith(PACKAGE + "."):
        return False
    rel = Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def plane_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations_of(module: str, path: Path) -> list[str]:
    plane = plane_of(module)
    out = []
    for imp in imports_of(path):
        top = imp.target.split(".")[0]
        where = f"{path.relative_to(ROOT.parent)}:{imp.line} imports {imp.target}"
        if top in ENGINE_PACKAGES and plane not in ADAPTERS:
            out.append(f"{where}: vLLM/Dynamo types belong in integration/ (or the tooling)")
        if top != PACKAGE:
            if plane == "index" and top not in sys.stdlib_module_names and top != "__future__":
                out.append(f"{where}: index/ uses the standard library only")
            continue
        target_plane = plane_of(imp.target)
        if plane == "index" and target_plane != "index":
            out.append(f"{where}: index/ imports nothing of the package outside itself")
        elif plane in CONFIG_MODULES and target_plane in PLANES:
            out.append(f"{where}: config imports no plane")
        elif target_plane in FORBIDDEN.get(plane, ()):
            out.append(f"{where}: {plane}/ must not depend on {target_plane}/")
    return out


def test_imports_follow_the_one_way_rule():
    problems = [line for module, path in modules().items() for line in violations_of(module, path)]
    assert not problems, "\n".join(problems)


def test_no_import_cycle_between_modules():
    graph = {
        module: {imp.target for imp in imports_of(path)
                 if not imp.type_only and imp.target.startswith(PACKAGE) and imp.target != module}
        for module, path in modules().items()
    }
    # a package's __init__ is imported with each of its modules: an edge to a module is one to its
    # parents too, but a package importing its own module is not a cycle through that parent
    cycles = _cycles({m: {t for t in targets if t in graph} for m, targets in graph.items()})
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
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
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for node in sorted(graph):
            if node not in index:
                connect(node)
    finally:
        sys.setrecursionlimit(limit)
    return found


def _reaches_above_package(node: ast.AST, depth: int) -> bool:
    """Whether `node` is `Path(__file__)...parents[k]`, `.parent` chained, or nested `os.path.dirname`
    over `__file__` reaching above the package directory (`depth`: directories from the module to it)."""
    ups = 0
    while True:
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "parents" and isinstance(node.slice, ast.Constant):
            ups += int(node.slice.value) + 1
            node = node.value.value
        elif isinstance(node, ast.Attribute) and node.attr == "parent":
            ups += 1
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dirname" \
                and node.args:
            ups += 1
            node = node.args[0]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.func, (ast.Name, ast.Attribute)) \
                and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("Path", "resolve", "abspath", "realpath"):
            node = node.args[0]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "resolve":
            node = node.func.value
        else:
            break
    return isinstance(node, ast.Name) and node.id == "__file__" and ups > depth + 1


def test_no_runtime_module_knows_the_checkout_path():
    problems = []
    for module, path in modules().items():
        if plane_of(module) in TOOLING:
            continue
        depth = len(path.relative_to(ROOT).parts) - 1  # directories between the module and the package
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if _reaches_above_package(node, depth):
                problems.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: reaches above the package "
                                "from __file__ (a checkout's layout; installed wheels have none)")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("source", "depth", "above"), [
    ("Path(__file__).resolve().parents[2]", 1, True),
    ("Path(__file__).parents[1]", 1, False),
    ("Path(__file__).parent.parent", 0, True),
    ("Path(__file__).parent", 0, False),
    ("os.path.dirname(os.path.dirname(os.path.abspath(__file__)))", 0, True),
    ("os.path.dirname(os.path.dirname(os.path.abspath(__file__)))", 1, False),
])
def test_the_checkout_path_detector(source, depth, above):
    node = ast.parse(source, mode="eval").body
    assert _reaches_above_package(node, depth) is above


def test_the_rules_catch_what_they_forbid(tmp_path, monkeypatch):
    """Each rule, against a module written to break it (the checks must be able to fail)."""
    fake = tmp_path / PACKAGE
    for rel, text in {
        "index/bad.py": "import numpy\nfrom dynamo_flexkv.storage import layout\n",
        "storage/bad.py": "from dynamo_flexkv.tiers import stack\n",
        "transfer/bad.py": "from ..integration.vllm import worker\n",
        "tiers/bad.py": "if TYPE_CHECKING:\n    from dynamo_flexkv.devtools import harness\n",
        "config.py": "from dynamo_flexkv.storage import backend\n",
        "storage/engine_types.py": "import vllm\n",
    }.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    by_module = {module: violations_of(module, path) for module, path in modules().items()}
    assert len(by_module["dynamo_flexkv.index.bad"]) == 2
    assert "must not depend on tiers/" in by_module["dynamo_flexkv.storage.bad"][0]
    assert "must not depend on integration/" in by_module["dynamo_flexkv.transfer.bad"][0]
    assert "must not depend on devtools/" in by_module["dynamo_flexkv.tiers.bad"][0]
    assert "config imports no plane" in by_module["dynamo_flexkv.config"][0]
    assert "belong in integration/" in by_module["dynamo_flexkv.storage.engine_types"][0]


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
