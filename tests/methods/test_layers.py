"""The layers of ``bids_denoise/methods``: methods are peers on a shared core.

Each method module (``methods/<name>.py``) imports the core (``methods/core/``) and nothing else of the
package: no other method, no app module. The core imports no method. Nothing in ``methods/`` imports
Nipype, pybids or nibabel (arrays in, arrays out), so the methods run where only numpy and torch exist.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import bids_denoise.methods

METHODS = Path(bids_denoise.methods.__file__).parent
CORE = METHODS / "core"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (late imports inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module in ("bids_denoise.methods", "bids_denoise.methods.core"):
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def method_modules() -> list[Path]:
    return sorted(path for path in METHODS.glob("*.py") if path.name != "__init__.py")


def test_there_are_methods_and_a_core():
    assert {path.stem for path in method_modules()} >= {"mppca", "nordic", "patch2self", "median", "noise2self",
                                                         "noise2noise", "p2snet", "superres"}
    assert (CORE / "localpca.py").is_file() and (CORE / "randmat.py").is_file()


@pytest.mark.parametrize("path", method_modules(), ids=lambda path: path.stem)
def test_a_method_imports_the_core_and_no_other_method(path):
    ours = {name for name in imported_modules(path) if name.startswith("bids_denoise")}
    outside_core = sorted(name for name in ours if not name.startswith("bids_denoise.methods.core"))
    assert not outside_core, f"{path.name} imports {outside_core}: a method stands on the core alone"


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda path: path.stem)
def test_the_core_imports_no_method(path):
    ours = {name for name in imported_modules(path) if name.startswith("bids_denoise")}
    above = sorted(name for name in ours if not name.startswith("bids_denoise.methods.core"))
    assert not above, f"core/{path.name} imports {above}: the core is below every method"


@pytest.mark.parametrize("path", sorted(METHODS.rglob("*.py")), ids=lambda path: str(path.relative_to(METHODS)))
def test_methods_are_pure_array_code(path):
    app_libraries = {"nipype", "bids", "nibabel"}
    found = sorted(name for name in imported_modules(path) if name.split(".")[0] in app_libraries)
    assert not found, f"{path.relative_to(METHODS)} imports {found}: methods take and return arrays"


def test_methods_import_with_numpy_and_torch_alone():
    """Import every method in a fresh interpreter that cannot see Nipype, pybids, nibabel or scipy (a GPU box
    that has torch and numpy only): nothing is imported before it is used."""
    blocked = ["nipype", "bids", "nibabel", "scipy", "matplotlib"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        + "".join(f"import bids_denoise.methods.{path.stem}\n" for path in method_modules())
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_registration_imports_no_other_registration():
    """Each registration stands on the contract, its method, the shared bibliography and training helpers."""
    import bids_denoise.registry

    folder = Path(bids_denoise.registry.__file__).parent
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        others = sorted(name for name in imported_modules(path)
                        if name.startswith("bids_denoise.registry.") and not name.split(".")[-1].startswith("_"))
        assert not others, f"registry/{path.name} imports {others}"
