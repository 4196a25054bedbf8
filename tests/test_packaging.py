"""pyproject.toml declares exactly the third-party packages src/ imports: none missing, none unused.

Optional ones (the extras other than dev, imported only where used) count as declared, and dev holds
them all, so CI tests every optional feature instead of skipping it."""

import ast
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow"}


def imported_packages(top_level_only: bool = False) -> set[str]:
    """Third-party distributions src/ imports (`top_level_only`: at module level, i.e. on every import of it)."""
    names = set()
    for path in (ROOT / "src").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body if top_level_only else ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    third_party = names - set(sys.stdlib_module_names) - {"zturbo_train", "__future__"}
    return {DISTRIBUTIONS.get(name, name).lower().replace("-", "_") for name in third_party}


def _names(specs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower().replace("-", "_") for spec in specs}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def declared_packages() -> set[str]:
    return _names(_project()["dependencies"])


def extra_packages() -> set[str]:
    """The optional extras users install for a feature (tensorboard, wandb); dev's test tools are not src's."""
    extras = _project()["optional-dependencies"]
    return _names([spec for name, specs in extras.items() if name != "dev" for spec in specs])


def test_dependencies_are_exactly_what_src_imports():
    """Core dependencies are exactly what src/ imports, less the extras (imported only where their feature is on)."""
    assert imported_packages() - extra_packages() == declared_packages()


def test_extras_are_optional_and_in_dev():
    """An extra is never a core dependency, never imported at module level (the core runs without it) and is
    installed by dev (so its tests run)."""
    extras = extra_packages()
    assert extras and not extras & declared_packages()
    assert not extras & imported_packages(top_level_only=True)
    assert extras <= _names(_project()["optional-dependencies"]["dev"])
