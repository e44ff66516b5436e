"""The shape of the code in src/mls: one meaning per public name across modules, and short functions.

A public name (not starting with ``_``) defined at module level by two modules reads as one thing in one
place and another elsewhere; a module that only imports another's name re-exports it and is no clash.
Functions and methods stay short enough to read at once.
"""
import ast
from collections import defaultdict
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "mls"
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, ast.Module]:
    """Every module of the package, parsed, by its path relative to src/mls."""
    return {path.relative_to(SOURCE).as_posix(): ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for path in sorted(SOURCE.rglob("*.py"))}


def assigned_names(target: ast.expr) -> set[str]:
    """The names an assignment target binds (``a``, ``a, b``, ``(a, [b, *c])``); not attributes or items."""
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, (ast.Tuple, ast.List)):
        return set().union(*(assigned_names(t) for t in target.elts))
    if isinstance(target, ast.Starred):
        return assigned_names(target.value)
    return set()


def defined_names(body: list[ast.stmt]) -> set[str]:
    """Names a module body defines itself: functions, classes and assignments, also under a module-level
    ``if``, ``try`` or ``with``; imports are not definitions. A name defined twice counts once."""
    names = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(*(assigned_names(t) for t in node.targets))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            names.update(assigned_names(node.target))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                names.update(defined_names(getattr(node, block, [])))
            for handler in getattr(node, "handlers", []):
                names.update(defined_names(handler.body))
    return names


def public_definitions() -> dict[str, list[str]]:
    """Each public module-level name and the modules that define it."""
    defined = defaultdict(list)
    for module, tree in modules().items():
        for name in sorted(defined_names(tree.body)):
            if not name.startswith("_"):
                defined[name].append(module)
    return defined


def test_the_walk_sees_the_package():
    found = modules()
    assert "method/model.py" in found and "eval/commands.py" in found and len(found) > 40
    assert "pretrain" in defined_names(found["train/fit.py"].body)  # defined once


def test_no_two_modules_define_the_same_public_name():
    clashes = {name: where for name, where in public_definitions().items() if len(where) > 1}
    assert not clashes, "public names defined by more than one module (rename one, or import it from the other):\n" + \
        "\n".join(f"  {name}: {', '.join(where)}" for name, where in sorted(clashes.items()))


def test_no_function_or_method_is_longer_than_60_lines():
    long = [f"  {module}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for module, tree in modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n" + "\n".join(long)


def test_identifiers_spell_neighbor_one_way():
    """Identifiers say "neighbor" (as the `mls visualize neighbors` command does); prose may say neighbour."""
    import io
    import tokenize

    british = sorted({tok.string for path in SOURCE.rglob("*.py")
                      for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
                      if tok.type == tokenize.NAME and "neighbour" in tok.string.lower()})
    assert british == []


# A module name used in several folders says the same kind of file in each.
SAME_KIND = {
    "settings": "settings dataclasses, each field declared with setting() (method, train, transfer)",
    "commands": "the wiring of a command line's sub-commands (train, eval, transfer)",
    "metrics": "scoring functions (eval: classification, transfer: detection and segmentation)",
}


def test_a_module_name_used_twice_names_one_kind_of_file():
    places = defaultdict(list)
    for path in SOURCE.rglob("*"):
        if (path.suffix == ".py" and path.stem != "__init__") or (path.is_dir() and path.name != "__pycache__"):
            places[path.stem].append(path.relative_to(SOURCE).as_posix())
    repeated = {name: where for name, where in places.items() if len(where) > 1}
    assert set(repeated) <= set(SAME_KIND), f"module names with two meanings: {repeated}"
    for path in SOURCE.rglob("settings.py"):
        assert "setting(" in path.read_text(encoding="utf-8"), path
