"""The layers of DESIGN.md import only downward: device code, ops and the reference, the model,
diffusion, then the product (api, cli, export, train, compat, ...). A lower layer that imports a
product module, even lazily inside a function, ties the mathematics to files, formats and the
command line above it, and makes import circles (diffusion.loops -> export -> diffusion).

Checked on the source (every import statement, at any depth, relative ones resolved), so a lazy
import cannot hide; and once at run time, in a fresh interpreter."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sr3fast"

# The product layer: modules that read and write files, parse arguments, train, evaluate, or
# speak other codebases' formats.
PRODUCT = ("api", "cli", "export", "evaluation", "train", "compat", "acceleration", "checkpoint",
           "images", "inference_settings", "tiling", "cascades", "folders", "distributed_upscale",
           "schedule_search", "__main__")
# Every layer below the product, as (name, files).
LOWER_LAYERS = {
    "diffusion": sorted((PACKAGE / "diffusion").glob("*.py")),
    "model": sorted((PACKAGE / "model").glob("*.py")),
    "ops": sorted((PACKAGE / "ops").rglob("*.py")) + [PACKAGE / "backends.py"],
    "reference": [PACKAGE / "reference.py"],
    "kernels": sorted((ROOT / "kernels").rglob("*.py")),
}


def _module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "kernels"):   # installed as sr3fast.kernels
        parts = ("sr3fast", "kernels", *path.relative_to(ROOT / "kernels").with_suffix("").parts)
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source` (the text of `module`), at any
    depth: `from . import x` yields the package's x as well as the package, since x may be a
    module."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def product_imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, product module) for every import of a product module in `source`."""
    bad = []
    for line, name in imported_modules(source, module, is_package):
        parts = name.split(".")
        if len(parts) >= 2 and parts[0] == "sr3fast" and parts[1] in PRODUCT:
            found = (line, ".".join(parts[:2]))
            if found not in bad:
                bad.append(found)
    return bad


@pytest.mark.parametrize("layer", sorted(LOWER_LAYERS))
def test_lower_layers_import_no_product_module(layer):
    files = LOWER_LAYERS[layer]
    assert files, f"no files found for layer {layer}"
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in files
           for line, name in product_imports(path.read_text(), _module_name(path), path.name == "__init__.py")]
    assert not bad, f"the {layer} layer imports the product layer:\n" + "\n".join(bad)


def test_the_check_sees_lazy_and_relative_imports():
    """The checker itself: imports inside a function, relative or absolute, of product modules are
    found (diffusion/loops.py once did `from ..export import load_package` in a function), and
    imports of lower layers are not."""
    source = ("import torch\nfrom .. import ops\nfrom .schedules import respace\n"
              "def f():\n    from ..export import load_package\n    from .. import api, reference\n"
              "    import sr3fast.train.cli\n")
    assert product_imports(source, "sr3fast.diffusion.loops") == [
        (5, "sr3fast.export"), (6, "sr3fast.api"), (7, "sr3fast.train")]
    # `.` in a package's __init__ is the package itself
    assert product_imports("from . import export\n", "sr3fast.diffusion", is_package=True) == []
    assert product_imports("from . import export\n", "sr3fast", is_package=True) == [(1, "sr3fast.export")]


def test_sampling_imports_nothing_from_the_product_layer_at_run_time():
    """A fresh interpreter that imports the samplers and loops has loaded no product module."""
    code = ("import sys, sr3fast.diffusion, sr3fast.diffusion.loops, sr3fast.diffusion.samplers\n"
            f"product = {PRODUCT!r}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sr3fast'\n"
            "             and len(m.split('.')) > 1 and m.split('.')[1] in product))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
