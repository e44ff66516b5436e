"""The method (``mls.method``) needs only torch, torchvision and the standard library: no module of it imports
the rest of mls (data, training, files, the command line), read from its source and seen in a fresh process."""
import ast
import subprocess
import sys
from pathlib import Path

METHOD = Path(__file__).resolve().parents[1] / "src" / "mls" / "method"
ALLOWED = {"torch", "torchvision", "mls"}  # ``mls`` itself only as ``mls.method`` (checked below)


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` of the file names, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            names.add(node.module)
    return names


def test_the_method_imports_only_torch_torchvision_the_standard_library_and_itself():
    outside = {}
    for path in sorted(METHOD.glob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            inside = name == "mls.method" or name.startswith("mls.method.")
            if (top == "mls" and not inside) or (top != "mls" and top not in ALLOWED
                                                 and top not in sys.stdlib_module_names):
                outside.setdefault(path.name, []).append(name)
    assert len(list(METHOD.glob("*.py"))) >= 8
    assert not outside, f"mls.method imports from outside torch, torchvision and itself: {outside}"


def test_importing_the_method_loads_no_other_part_of_mls():
    code = ("import sys, mls.method; "
            "print(sorted(m for m in sys.modules if m.startswith('mls') and not m.startswith('mls.method')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['mls']"
