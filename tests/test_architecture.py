"""ARCHITECTURE.md's layout matches the package: every module named there exists, every module is named."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "zturbo_train"


def layout_modules() -> set[str]:
    """Module paths the layout block names: `name.py` at top level, or under the `folder/` line it sits on."""
    block = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8").split("```")[1]
    names, folder = set(), ""
    for line in block.splitlines()[2:]:
        head = line[:25].strip()
        if head.endswith("/"):
            folder = head
        elif head:
            folder = ""
        text = line[:25] if not folder else line
        names |= {folder + name for name in re.findall(r"\b([a-z_0-9]+\.py)\b", text)}
    return names


def package_modules() -> set[str]:
    return {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}


def test_architecture_layout_matches_the_tree():
    assert layout_modules() == package_modules()
