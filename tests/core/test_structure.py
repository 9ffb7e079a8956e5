"""The layout holds: the core is engine-neutral, the engines use only public names, one implementation of each
shared step. Read from the source with ``ast`` (nothing imported), so a regression fails here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cap_dist"


def _imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from X import name`` and ``(module, "")`` of every ``import X``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return found


def _modules(folder: str = "") -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def test_no_private_name_is_imported_across_modules() -> None:
    bad = [f"{p.relative_to(PACKAGE.parent)}: from {m} import {n}" for p in _modules() for m, n in _imports(p)
           if m.startswith("cap_dist") and n.startswith("_") and n != "__version__"]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder, forbidden", [
    ("core", ("ray", "cap_dist.engines", "cap_dist.output", "cap_dist.finetune")),
    ("solvers", ("ray", "cap_dist.engines", "cap_dist.core", "cap_dist.models", "cap_dist.storage")),
    ("engines/distributed", ("cap_dist.engines.local",)),
])
def test_layers_import_only_downwards(folder: str, forbidden: tuple[str, ...]) -> None:
    bad = [f"{p.relative_to(PACKAGE.parent)} imports {m}" for p in _modules(folder) for m, _ in _imports(p)
           if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not bad, "\n".join(bad)


def test_no_module_imports_names_from_the_package_root() -> None:
    """``cap_dist/__init__.py`` lazily exposes the engines; a module taking a name from it (rather than a submodule
    through it, ``from cap_dist import storage``) is a latent cycle."""
    submodules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    bad = [f"{p.relative_to(PACKAGE.parent)}: {n}" for p in _modules() if p.name != "__main__.py"
           for m, n in _imports(p) if m == "cap_dist" and n not in submodules]
    assert not bad, bad


@pytest.mark.parametrize("name", ["allocate_global", "register_forward_pre_hook", "startswith(\"timm:\")"])
def test_each_shared_step_has_one_home(name: str) -> None:
    """Global allocation is called from core.allocate only, forward hooks for curvature are registered in the one
    capture path (and the stage placement probe), and only ModelSource looks at source prefixes."""
    homes = {"allocate_global": {"cap_dist/core/allocate.py", "cap_dist/solvers/__init__.py",
                                 "cap_dist/solvers/patterns.py"},
             "register_forward_pre_hook": {"cap_dist/models/capture.py", "cap_dist/core/stages.py"},
             "startswith(\"timm:\")": {"cap_dist/models/source.py", "cap_dist/models/spec.py"}}[name]
    users = {str(p.relative_to(PACKAGE.parent)) for p in _modules() if name in p.read_text()}
    assert users <= homes, f"{name} appears outside its home: {sorted(users - homes)}"
