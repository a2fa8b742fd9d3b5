"""The layers and habits of the code base, as rules a change cannot break unnoticed: imports run
one way (cli -> server, client -> harmonization -> common), no import cycle, only the Flower
entry points and hooks import ``flwr``, message types are spelled once (``common/messages.py``)
and long modules say why they are long."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.messages import MessageType

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "common", "client", "server", "harmonization")
#: What each layer may import of the project's own packages.
MAY_IMPORT = {
    "common": {"common"},
    "harmonization": {"harmonization", "common"},
    "client": {"client", "harmonization", "common"},
    "server": {"server", "harmonization", "common"},
    "cli": set(PACKAGES),
}
#: The two apps and the records they exchange; the CNN's Flower strategy; and the places that
#: work on Flower's own processes: the simulation engine's entry, the app bundle's hash, the
#: site's app allow-list inside its SuperNode, and the gateway that forwards exactly Flower's
#: Fleet API routes.
FLOWER_MODULES = {"client/app.py", "server/app.py", "common/records.py", "server/strategy.py",
                  "cli/simulation.py", "common/bundle.py", "client/supernode.py",
                  "server/gateway.py"}
#: A module longer than this says why at its top (``Longer than 400 lines: ...``).
MAX_LINES = 400


def sources(*packages: str) -> Iterator[Path]:
    for package in packages:
        yield from sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[tuple[str, ast.AST, bool]]:
    """Every module ``path`` imports, the import statement, and whether it sits at module level
    (or under ``if TYPE_CHECKING``) rather than inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node, id(node) not in inside
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if (ROOT / (full.replace(".", "/") + ".py")).exists()
                       or (ROOT / full.replace(".", "/")).is_dir() else base), node, \
                    id(node) not in inside


def first_party(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def test_layers_import_only_downwards():
    wrong = []
    for path in sources(*PACKAGES):
        layer = path.relative_to(ROOT).parts[0]
        for name, node, _ in imports(path):
            if first_party(name) and name.split(".")[0] not in MAY_IMPORT[layer]:
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for path in sources(*PACKAGES):
        graph[module_name(path)] = {name for name, _, _ in imports(path) if first_party(name)}
    modules = set(graph)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: {r for n in names if (r := resolve(n)) and r != m} for m, names in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for module in sorted(modules):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def comment_above(lines: list[str], index: int) -> bool:
    """Whether a comment stands right above the block of imports that line ``index`` is in."""
    while index > 0 and lines[index - 1].strip().startswith(("import ", "from ")):
        index -= 1
    return index > 0 and lines[index - 1].strip().startswith("#")


def test_imports_inside_functions_say_why():
    """An import inside a function hides a dependency (and, before, an import cycle): each one
    left carries a comment saying why (a heavy library loaded only where it is used, an
    optional one)."""
    unexplained = []
    for path in sources(*PACKAGES):
        lines = path.read_text(encoding="utf-8").splitlines()
        for name, node, top in imports(path):
            if top or name == "__future__":
                continue
            if "#" not in lines[node.lineno - 1] and not comment_above(lines, node.lineno - 1):
                unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not unexplained, "\n".join(unexplained)


def test_only_the_apps_the_records_and_the_process_hooks_import_flower():
    importers = {str(path.relative_to(ROOT)) for path in sources(*PACKAGES)
                 if any(name.split(".")[0] == "flwr" for name, _, _ in imports(path))}
    assert importers <= FLOWER_MODULES, sorted(importers - FLOWER_MODULES)
    assert importers == FLOWER_MODULES  # the check above is not vacuous


def message_type_literals(path: Path) -> Iterator[tuple[int, str]]:
    """String literals that spell a message type: a ``query.*`` type anywhere, Flower's
    ``train`` and ``evaluate`` where a message type is meant (``message_type=``, or compared
    with a ``.message_type``)."""
    queries = {t.value for t in MessageType if t.value.startswith("query.")}
    flower = {t.value for t in MessageType} - queries
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in queries:
            yield node.lineno, node.value
        elif isinstance(node, ast.keyword) and node.arg == "message_type" and isinstance(
                node.value, ast.Constant) and node.value.value in flower:
            yield node.value.lineno, node.value.value
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "message_type" for s in sides):
                yield from ((s.lineno, s.value) for s in sides
                            if isinstance(s, ast.Constant) and s.value in flower)


def test_message_types_are_spelled_only_in_common_messages():
    found = [f"{path.relative_to(ROOT)}:{line} spells {value!r}"
             for path in sources(*PACKAGES, "tests", "bench")
             if path != ROOT / "common" / "messages.py" and path != Path(__file__)
             for line, value in message_type_literals(path)]
    assert not found, "\n".join(found)


def test_long_modules_say_why_at_their_top():
    """The packages, and the tests, benchmarks and docs build code beside them."""
    long = []
    for path in sources(*PACKAGES, "tests", "bench", "docs"):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_LINES and f"Longer than {MAX_LINES} lines" not in (
                ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
    assert not long, "\n".join(long)


@pytest.mark.parametrize("rule", [test_layers_import_only_downwards, test_no_import_cycle,
                                  test_message_types_are_spelled_only_in_common_messages])
def test_the_rules_catch_what_they_forbid(rule, tmp_path: Path,  # noqa: ANN001
                                          monkeypatch: pytest.MonkeyPatch):
    """Each rule fails on a tree that breaks it (a back-import, a cycle, a literal)."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "tests").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "common" / "a.py").write_text("from common import b\nfrom server import app\n")
    (tmp_path / "common" / "b.py").write_text(
        "from common import a\nx = 'query.handshake'\nsend(message_type='train')\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    expected = pytest.fail.Exception if rule is test_no_import_cycle else AssertionError
    with pytest.raises(expected):
        rule()
