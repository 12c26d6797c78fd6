"""docs/design.md's module table lists every module of the package, one line each, and no other."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_module_table_matches_the_tree():
    text = (ROOT / "docs" / "design.md").read_text()
    listed = re.findall(r"^\| `([\w/]+\.py)` \|", text, re.MULTILINE)
    package = ROOT / "streamlstm"
    tree = sorted(str(p.relative_to(package)) for p in package.rglob("*.py"))
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(listed) == tree
