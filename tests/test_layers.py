"""The house in layers: core -> families -> formats -> train -> the tools -> cli. Each layer imports only
from itself and the layers before it; no module imports another in a circle; and every import of an esd
module stands at the top of its file (an import inside a function is kept for optional or heavy third-party
packages only, so that no circle can hide inside a function). Read from the source (ast), so imports inside
functions count."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "esd"
LAYERS = ("core", "families", "formats", "train", "tools", "cli")
TOOLS = ("generate", "eval", "attack", "export", "reproduce", "toy", "pipeline", "app")


def layer_of(module: str) -> str:
    """The layer of ``module`` (a dotted name under esd) by its folder; a tool's ``cli`` module is the cli's."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in ("cli", "commands", "__main__", "flags") or parts[-1] == "cli":
        return "cli"
    if parts[0] in TOOLS:
        return "tools"
    if parts[0] in LAYERS:
        return parts[0]
    raise AssertionError(f"esd.{'.'.join(parts)} lies in no layer; put it in one of the layers' folders")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(module: str, path: Path, known: dict) -> list[tuple[str, int, bool]]:
    """(imported esd module, line, inside a function) for each esd import of ``module``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.split(".")[0] == "esd")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[:len(package.split(".")) - (child.level - 1)]
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module or ""
                if name.split(".")[0] == "esd":
                    for a in child.names:  # `from esd.eval import classify` imports a module
                        sub = f"{name}.{a.name}"
                        found.append((sub if sub in known else name, child.lineno, in_function))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    known = modules()
    return {m: [i for i in imports(m, p, known) if i[0] != m] for m, p in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


@pytest.fixture(scope="module")
def edges():
    g = graph()
    assert len(g) > 50 and sum(len(v) for v in g.values()) > 200  # the walk found the package's imports
    return g


def test_every_module_lies_in_a_layer(edges):
    assert {layer_of(m) for m in edges} == set(LAYERS)


def test_no_layer_imports_a_later_one(edges):
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)}) at line {line}"
              for m, found in edges.items() for t, line, _ in found if rank[layer_of(t)] > rank[layer_of(m)]]
    assert not upward, "\n".join(sorted(set(upward)))


def test_no_import_circle(edges):
    assert circles({m: {t for t, _, _ in found} for m, found in edges.items()}) == []


def test_esd_imports_stand_at_the_top_of_their_file(edges):
    inside = [f"{m} imports {t} inside a function (line {line})" for m, found in edges.items()
              for t, line, in_function in found if in_function]
    assert not inside, "\n".join(sorted(set(inside)))


def test_imports_left_inside_functions_say_why():
    """What is still imported inside a function is a third-party package kept lazy on purpose (an optional
    extra such as NudeNet or bitsandbytes, a deprecated pipeline, matplotlib's backend): the line, or the
    one above it, says which and why."""
    unexplained, kept = [], []

    def visit(node, in_function, path, lines):
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                kept.append(child)
                line, above = lines[child.lineno - 1], lines[child.lineno - 2].strip()
                if "#" not in line and not above.startswith("#"):
                    unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{child.lineno}: {line.strip()}")
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)), path, lines)

    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        visit(ast.parse("\n".join(lines)), False, path, lines)
    assert kept and not unexplained, "\n".join(unexplained)


def test_the_tests_mirror_the_layers():
    """tests/ has one folder per layer (the tools together), and its test files live in them."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders == {"core", "families", "formats", "train", "tools", "cli"}
    assert [p.name for p in tests.glob("test_*.py")] == ["test_layers.py"]  # the house's own test


def test_the_checks_catch_what_they_are_for():
    """The walk sees an import inside a function, a relative one and a circle."""
    source = "from .b import x\n\ndef f():\n    from esd.c import y\n"
    tmp = {"esd.a": None, "esd.b": None, "esd.c": None}

    class Path_:
        name = "a.py"

        def read_text(self):
            return source

    found = imports("esd.a", Path_(), tmp)
    assert found == [("esd.b", 1, False), ("esd.c", 4, True)]
    assert circles({"esd.a": {"esd.b"}, "esd.b": {"esd.c"}, "esd.c": {"esd.a"}}) == [["esd.a", "esd.b", "esd.c"]]
    assert layer_of("esd.eval.cli") == "cli" and layer_of("esd.core.views") == "core"


FAMILY_NAMES = {"sd1", "sd2", "sdxl", "sd3", "flux"}


def family_tests(tree: ast.AST) -> list[int]:
    """Lines of a comparison with a family's name (``x == "sdxl"``, ``x in ("sd3", "flux")``): what a family's
    own object should answer (esd.families.family.Family)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = [n for o in operands for n in ([o] if isinstance(o, ast.Constant) else
                                                     getattr(o, "elts", []) if isinstance(o, (ast.Tuple, ast.List,
                                                                                                ast.Set)) else [])
                     if isinstance(n, ast.Constant) and n.value in FAMILY_NAMES]
            if names:
                found.append(node.lineno)
    return found


def test_no_family_is_tested_by_name_outside_the_families():
    """Outside esd/families (and in benchmarks/, which use the package), nothing compares with a family's name:
    the family's object answers (one adapter per family; a new family is one file there)."""
    files = [p for m, p in modules().items() if layer_of(m) != "families"]
    files += sorted((PACKAGE.parent / "benchmarks").glob("*.py"))
    found = {f"{p.relative_to(PACKAGE.parent)}:{line}" for p in files
             for line in family_tests(ast.parse(p.read_text()))}
    assert not found, sorted(found)
    # the check sees what it is for
    assert family_tests(ast.parse('if family == "sdxl": pass\nok = m in ("sd3", "flux")\nx = a == "unet"')) == [1, 2]
