"""The package's import structure (docs/STYLE.md, practice 11), read from the source with `ast`.

- A module's private names stay inside it: no `from sdpg_megatron.x import _name`, no
  `x._name` on a module of the package, in any module of `sdpg_megatron/`. Dunder names
  (`__version__`) are public.
- Two modules never import each other: the graph of module-level imports among the
  package's modules has no cycle. Importing `a.b.c` runs the packages `a` and `a.b`
  first, so it counts as importing them too, except for the importer's own packages
  (which Python has already started). Imports inside functions and under
  `if TYPE_CHECKING:` are not run at import time and do not count for cycles.
- Functions nest at most two deep (a function in a function): a loss or a pass callback
  past that is a named object or a module-level function (`partial(loss_func, ...)`).
- Test files share code through helper modules (tests/helpers.py, tests/distributed.py),
  never by importing another test file: no file in tests/ imports a `tests.test_*` module,
  at module level or inside a function.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "sdpg_megatron"
ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@dataclass
class _ModuleImports:
    """What one module imports from the package: module-level edges, private names, and the
    names it binds to modules of the package (for `module._name`)."""

    name: str
    is_package: bool
    modules: set[str]
    edges: set[str] = field(default_factory=set)
    private: list[str] = field(default_factory=list)
    bindings: dict[str, str] = field(default_factory=dict)

    def resolve(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.name.split(".") if self.is_package else self.name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def add_edge(self, target: str, module_level: bool) -> None:
        if not module_level or target not in self.modules:
            return
        own = set(_ancestors(self.name)) | ({self.name} if self.is_package else set())
        for module in [*_ancestors(target), target]:
            if module in self.modules and module not in own and module != self.name:
                self.edges.add(module)

    def visit(self, node: ast.AST, module_level: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            module_level = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            module_level = False
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != PACKAGE:
                    continue
                self.add_edge(alias.name, module_level)
                if alias.asname:
                    self.bindings[alias.asname] = alias.name
                else:
                    self.bindings[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = self.resolve(node)
            if source.split(".")[0] == PACKAGE:
                self.add_edge(source, module_level)
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in self.modules:
                        self.add_edge(submodule, module_level)
                        self.bindings[alias.asname or alias.name] = submodule
                    elif _is_private(alias.name):
                        self.private.append(f"line {node.lineno}: from {source} import {alias.name}")
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            target = self.dotted_module(node.value)
            if target is not None and target in self.modules and target != self.name:
                self.private.append(f"line {node.lineno}: {ast.unparse(node)} ({target}.{node.attr})")
        for child in ast.iter_child_nodes(node):
            self.visit(child, module_level)

    def dotted_module(self, node: ast.AST) -> str | None:
        """The package module a Name/Attribute chain names through this module's imports."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or node.id not in self.bindings:
            return None
        return ".".join([self.bindings[node.id], *reversed(parts)])


def _is_type_checking(test: ast.AST) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def package_imports() -> dict[str, _ModuleImports]:
    modules = _modules()
    result = {}
    for name, path in modules.items():
        imports = _ModuleImports(name, path.name == "__init__.py", set(modules))
        imports.visit(ast.parse(path.read_text(), filename=str(path)), module_level=True)
        result[name] = imports
    return result


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(node: str) -> None:  # the graph is a few dozen modules deep at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
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
            connect(node)
    return sorted(cycles)


def test_no_private_name_is_imported_across_modules():
    crossings = {name: imports.private for name, imports in package_imports().items() if imports.private}
    assert not crossings, (
        "private names used outside their module (give shared code a module of its own with public names): "
        f"{crossings}"
    )


def test_no_import_cycle_among_the_package_modules():
    graph = {name: imports.edges for name, imports in package_imports().items()}
    assert not import_cycles(graph), f"module-level import cycles: {import_cycles(graph)}"


def test_the_checks_see_what_they_should():
    """The checker itself, on a made-up package: a private import, a private attribute of an
    imported module, a cycle through a package's __init__, and what does not count."""
    modules = {f"{PACKAGE}.{m}" for m in ("a", "b", "sub", "sub.c", "sub.d")}
    source = {
        "a": f"from {PACKAGE}.sub import c\nfrom {PACKAGE}.b import _hidden, shown\nx = c._secret\n"
             f"def f():\n    from {PACKAGE} import b\n    return b._late\n",
        "sub": f"from {PACKAGE}.sub.d import thing\n",
        "sub.d": f"from {PACKAGE} import a\nfrom {PACKAGE}.sub import c\nimport {PACKAGE}.b as bee\ny = bee.__doc__\n",
    }
    found = {}
    for short, text in source.items():
        name = f"{PACKAGE}.{short}"
        imports = _ModuleImports(name, short == "sub", modules)
        imports.visit(ast.parse(text), module_level=True)
        found[short] = imports
    assert [p.split(": ", 1)[1] for p in found["a"].private] == [
        f"from {PACKAGE}.b import _hidden", f"c._secret ({PACKAGE}.sub.c._secret)", f"b._late ({PACKAGE}.b._late)"]
    assert found["a"].edges == {f"{PACKAGE}.sub", f"{PACKAGE}.sub.c", f"{PACKAGE}.b"}  # not f()'s import
    assert found["sub.d"].edges == {f"{PACKAGE}.a", f"{PACKAGE}.sub.c", f"{PACKAGE}.b"}  # not its own package
    assert not found["sub.d"].private  # a dunder is public
    graph = {f"{PACKAGE}.{short}": imports.edges for short, imports in found.items()}
    assert import_cycles(graph) == [[f"{PACKAGE}.a", f"{PACKAGE}.sub", f"{PACKAGE}.sub.d"]]


def imports_of_test_modules(tree: ast.AST, package: str = "tests") -> list[str]:
    """The imports anywhere in `tree` (a file of the `package` folder) that name a test module
    (`test_*`) of that folder: `import tests.test_x`, `from tests.test_x import y`,
    `from tests import test_x`, and their relative forms."""
    found = []
    for node in sorted(ast.walk(tree), key=lambda n: getattr(n, "lineno", 0)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level == 1:  # from .x / from . (tests/ has no subpackages)
                source = ".".join(part for part in (package, source) if part)
            names = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if len(parts) >= 2 and parts[0] == package and parts[1].startswith("test_"):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
                break
    return found


def test_test_files_share_code_through_helpers_only():
    crossings = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        found = imports_of_test_modules(ast.parse(path.read_text(), filename=str(path)))
        if found:
            crossings[str(path.relative_to(ROOT))] = found
    assert not crossings, (
        "test files importing other test files (move what they share into tests/helpers.py): "
        f"{crossings}"
    )


def test_the_test_import_check_sees_what_it_should():
    source = (
        "from tests.test_model_parity import VOCAB\n"
        "import tests.test_conversion as conversion\n"
        "from tests import test_vocab_parallel, helpers\n"
        "from .test_train import _config\n"
        "def f():\n    from tests.test_model_parity import _pipeline_forward\n"
        "from tests.helpers import VOCAB\nfrom tests.distributed import run_distributed\nimport tests.helpers\n"
        "from . import helpers\nimport testing.test_x\n"
    )
    assert [line.split(":")[0] for line in imports_of_test_modules(ast.parse(source))] == [
        "line 1", "line 2", "line 3", "line 4", "line 6"]


MAX_FUNCTION_NESTING = 2  # a function in a function; a third level is a named object or a module function


def deepest_nesting(tree: ast.AST) -> tuple[int, list[str]]:
    """The most functions (defs and lambdas) nested in one another anywhere in `tree`, and
    that chain's names, outermost first. A class does not count: a method is level 1."""
    deepest: tuple[int, list[str]] = (0, [])
    stack: list[tuple[ast.AST, list[str]]] = [(tree, [])]
    while stack:
        node, chain = stack.pop()
        for child in ast.iter_child_nodes(node):
            inner = chain
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inner = chain + [getattr(child, "name", "<lambda>")]
                deepest = max(deepest, (len(inner), inner), key=lambda found: found[0])
            stack.append((child, inner))
    return deepest


def test_closures_are_at_most_two_deep():
    """A loss is a named object in the shape of Megatron's `partial(loss_func, ...)`, not a
    closure six functions deep (docs/STYLE.md): no function of the package nests deeper."""
    deep = {}
    for name, path in _modules().items():
        depth, chain = deepest_nesting(ast.parse(path.read_text(), filename=str(path)))
        if depth > MAX_FUNCTION_NESTING:
            deep[name] = " → ".join(chain)
    assert not deep, f"functions nested more than {MAX_FUNCTION_NESTING} deep (name the inner ones): {deep}"


def test_the_nesting_check_sees_what_it_should():
    source = ("def a():\n    def b():\n        return lambda x: x\n    return b\n"
              "class C:\n    def m(self):\n        def n():\n            pass\n")
    assert deepest_nesting(ast.parse(source)) == (3, ["a", "b", "<lambda>"])
    assert deepest_nesting(ast.parse("class C:\n    def m(self):\n        return [lambda: 0]\n"))[0] == 2
