"""No underscore name of a third-party package, anywhere in the proxy or its tests.

A name that starts with an underscore is a library's own business: it changes
without notice between releases. The check reads the source (AST) and fails on:
1. an import of an underscore name from a third-party module
   (`from aiohttp.web_protocol import _ErrInfo`, `import aiohttp._http_parser`);
2. an underscore attribute reached from a third-party name (`web._x`, `aiohttp.abc._y`);
3. in the package, `x._y` on anything but `self` or `cls`: without types, the object
   could be a library's, so only a class's own attributes may be private;
4. `self._y` in a class with a third-party base, where `_y` is not the class's own
   (in its `__slots__`, assigned on `self`, or defined in its body): it would be the
   base's; and an own underscore name that the base has too (checked on the imported
   class), which would silently take over the base's.
Dunder names (`__init__`, `__name__`) are not private.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OWN_ROOTS = frozenset({"proxy", "tests"})
SELF_NAMES = frozenset({"self", "cls"})


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_third_party(module: str) -> bool:
    root = module.split(".")[0]
    return bool(root) and root not in OWN_ROOTS and root not in sys.stdlib_module_names


def third_party_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> the third-party module path it stands for (module or member)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_third_party(alias.name):
                    local = alias.asname or alias.name.split(".")[0]
                    names[local] = alias.name if alias.asname else local
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and is_third_party(node.module)
        ):
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def root_name(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def own_attributes(cls: ast.ClassDef) -> set[str]:
    """What a class defines itself: slots, attributes set on self, body names."""
    names: set[str] = set()
    for item in cls.body:
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(item.name)
        elif isinstance(item, ast.Assign | ast.AnnAssign):
            targets = item.targets if isinstance(item, ast.Assign) else [item.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
                    if target.id == "__slots__" and item.value is not None:
                        names.update(
                            e.value
                            for e in ast.walk(item.value)
                            if isinstance(e, ast.Constant) and isinstance(e.value, str)
                        )
    for node in ast.walk(cls):
        assigned: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            assigned = node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            assigned = [node.target]
        for target in assigned:
            for element in ast.walk(target):
                if (
                    isinstance(element, ast.Attribute)
                    and isinstance(element.value, ast.Name)
                    and element.value.id in SELF_NAMES
                ):
                    names.add(element.attr)
    return names


def third_party_bases(cls: ast.ClassDef, names: dict[str, str]) -> list[str]:
    """The dotted paths of `cls`'s bases that are third-party classes."""
    bases = []
    for base in cls.bases:
        root = root_name(base)
        if root is None or root not in names:
            continue
        rest = ast.unparse(base)[len(root) :]
        bases.append(names[root] + rest)
    return bases


def violations(source: str, *, package: bool) -> Iterator[tuple[int, str]]:
    """(line, what) for each use of a third-party private name in `source`."""
    tree = ast.parse(source)
    names = third_party_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if is_third_party(node.module):
                if any(is_private(part) for part in node.module.split(".")):
                    yield node.lineno, f"imports from private module {node.module}"
                for alias in node.names:
                    if is_private(alias.name):
                        yield node.lineno, f"imports {alias.name} from {node.module}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if is_third_party(alias.name) and any(
                    is_private(part) for part in alias.name.split(".")
                ):
                    yield node.lineno, f"imports private module {alias.name}"
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            root = root_name(node)
            if root in names:
                yield node.lineno, f"{ast.unparse(node)}: private to {names[root]}"
            elif package and not (isinstance(node.value, ast.Name) and node.value.id in SELF_NAMES):
                yield node.lineno, f"{ast.unparse(node)}: private to whoever owns it"
        elif isinstance(node, ast.ClassDef) and third_party_bases(node, names):
            own = own_attributes(node)
            for inner in ast.walk(node):
                if (
                    isinstance(inner, ast.Attribute)
                    and is_private(inner.attr)
                    and isinstance(inner.value, ast.Name)
                    and inner.value.id in SELF_NAMES
                    and inner.attr not in own
                ):
                    yield inner.lineno, f"self.{inner.attr}: {node.name}'s third-party base's"


def sources() -> list[Path]:
    return sorted([*(ROOT / "proxy").rglob("*.py"), *(ROOT / "tests").rglob("*.py")])


@pytest.mark.timeout(120)
def test_no_private_name_of_a_third_party_package_is_used() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in sources()
        for line, what in violations(path.read_text(), package=path.is_relative_to(ROOT / "proxy"))
    ]
    assert found == []


def classes_with_third_party_bases() -> Iterator[tuple[str, str, set[str], list[str]]]:
    """(module, class, own private names, third-party bases) for the package's classes."""
    for path in sorted((ROOT / "proxy").rglob("*.py")):
        tree = ast.parse(path.read_text())
        names = third_party_names(tree)
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = third_party_bases(node, names)
                if bases:
                    own = {name for name in own_attributes(node) if is_private(name)}
                    yield module, node.name, own, bases


def resolve(dotted: str) -> object:
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            target = getattr(target, part)
        return target
    raise ImportError(dotted)


def base_names(cls: type) -> set[str]:
    """Every attribute name a class and its bases define, slots included."""
    names: set[str] = set()
    for klass in cls.__mro__:
        names.update(vars(klass))
        slots = vars(klass).get("__slots__", ())
        names.update((slots,) if isinstance(slots, str) else slots)
    return names


@pytest.mark.timeout(120)
def test_no_own_private_name_takes_over_a_third_party_bases() -> None:
    clashes = []
    checked = 0
    for module, name, own, bases in classes_with_third_party_bases():
        for dotted in bases:
            base = resolve(dotted)
            if not isinstance(base, type):
                continue
            checked += 1
            clashes += [f"{module}.{name}.{a} (also {dotted}'s)" for a in own & base_names(base)]
    assert checked > 0  # the public port's connection subclasses aiohttp's BaseProtocol
    assert clashes == []


BAD = {
    "private import": "from aiohttp.web_protocol import RequestHandler, _ErrInfo\n",
    "private module": "import aiohttp._http_parser\n",
    "from private module": "from aiohttp._websocket import reader\n",
    "module attribute": "from aiohttp import web\nx = web._private\n",
    "deep attribute": "import aiohttp\nx = aiohttp.web_protocol._ErrInfo\n",
    "object attribute": "def f(handler):\n    return handler._waiter\n",
    "base's attribute": (
        "from aiohttp.web_protocol import RequestHandler\n"
        "class H(RequestHandler):\n"
        "    def data_received(self, data):\n"
        "        return self._messages\n"
    ),
}
GOOD = {
    "own attribute": (
        "from aiohttp.base_protocol import BaseProtocol\n"
        "class P(BaseProtocol):\n"
        "    __slots__ = ('_mine',)\n"
        "    def __init__(self, loop):\n"
        "        super().__init__(loop)\n"
        "        self._other = 1\n"
        "    def f(self):\n"
        "        return self._mine, self._other, self.transport\n"
    ),
    "stdlib": "import asyncio\nasyncio.get_running_loop()\n",
    "dunder": "import aiohttp\nv = aiohttp.__version__\n",
    "public": "from aiohttp.http import HttpRequestParser\n",
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("source", BAD.values(), ids=BAD.keys())
def test_the_check_finds_each_kind_of_private_use(source: str) -> None:
    assert list(violations(source, package=True)) != []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("source", GOOD.values(), ids=GOOD.keys())
def test_the_check_passes_public_and_own_names(source: str) -> None:
    assert list(violations(source, package=True)) == []


@pytest.mark.timeout(120)
def test_tests_may_reach_the_packages_own_private_attributes() -> None:
    source = "def f(proxy):\n    return proxy.server._forwarder\n"
    assert list(violations(source, package=False)) == []
    assert list(violations(source, package=True)) != []
