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


def imported_packages() -> set[str]:
    names = set()
    for path in (ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
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
    project = _project()
    optional = {name: specs for name, specs in project.get("optional-dependencies", {}).items() if name != "dev"}
    return _names(project["dependencies"]).union(*map(_names, optional.values()))


def test_dependencies_are_exactly_what_src_imports():
    assert imported_packages() == declared_packages()


def test_dev_installs_every_optional_extra():
    extras = _project()["optional-dependencies"]
    for name, specs in extras.items():
        assert _names(specs) <= _names(extras["dev"]), name
