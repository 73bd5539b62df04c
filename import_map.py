"""Which lesson imports which: read from the import_module("NN_name.module") calls of every lesson's files.

The lessons import each other by dotted path through importlib (their directory names start with digits), which
tools cannot follow; this prints the map README.md shows, and refuses an import of a later lesson (the reading
order: a learner never meets code from a lesson they have not read).

    python import_map.py            # print the map (tests/test_readme.py checks README.md holds this very text)
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def lessons() -> list:
    return sorted(p for p in ROOT.iterdir() if p.is_dir() and p.name[:2].isdigit() and p.name[2] == "_")


def imports(lesson: Path) -> set:
    """The other lessons whose modules a lesson's .py files import with import_module("NN_name.module")."""
    found = set()
    for path in lesson.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "import_module"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                top = node.args[0].value.split(".")[0]
                if top[:2].isdigit() and top[2:3] == "_":  # a lesson, not a package imported lazily (wandb)
                    found.add(top)
    return found - {lesson.name}


def import_map() -> str:
    """One line per lesson: the earlier lessons it imports. A ValueError if one imports a later or unknown one."""
    names = [p.name for p in lessons()]
    lines = []
    for lesson in lessons():
        used = sorted(imports(lesson))
        wrong = [u for u in used if u not in names or names.index(u) > names.index(lesson.name)]
        if wrong:
            raise ValueError(f"{lesson.name} imports {', '.join(wrong)}: a lesson imports earlier lessons only")
        lines.append(f"{lesson.name:<16} <- {', '.join(u[:2] for u in used) or '(none)'}")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        print(import_map())
    except ValueError as e:
        sys.exit(f"error: {e}")
