"""README.md is the front page: its tables are well-formed, its import map is the code's, its commands name real files.

Run: python -m pytest tests/test_readme.py -q
"""

import re
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
import_map = import_module("import_map")


def tables(text: str) -> list:
    """Every Markdown table: a list of its rows, each a list of cells (a pipe escaped as \\| stays inside its cell)."""
    out, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif current:
            out.append(current)
            current = []
    return out


def test_every_table_has_as_many_cells_per_row_as_its_header():
    found = tables(README)
    assert len(found) >= 2, "README.md should hold the reading-order and the results tables"
    for rows in found:
        header, separator, *body = rows
        assert all(set(c) <= set("-: ") and c for c in separator), f"row 2 of the table under {header} is not |---|"
        for row in body:
            assert len(row) == len(header), f"{len(row)} cells, header has {len(header)}: {' | '.join(row)[:120]}"


def test_the_table_parser_sees_a_broken_row():
    broken = "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 | 5 |\n"
    assert [len(r) for r in tables(broken)[0]] == [2, 2, 2, 3]


def test_the_import_map_in_the_readme_is_the_codes():
    block = re.search(r"<!-- import map: python import_map.py -->\n```\n(.*?)\n```", README, re.S)
    assert block, "README.md must hold the import map between its marker and a code fence"
    assert block.group(1) == import_map.import_map()


def test_the_import_map_refuses_a_later_lesson(tmp_path, monkeypatch):
    for name, body in [("01_a", 'm = import_module("02_b.x")\n'), ("02_b", "")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.py").write_text(body)
    monkeypatch.setattr(import_map, "ROOT", tmp_path)
    try:
        import_map.import_map()
    except ValueError as e:
        assert "01_a imports 02_b" in str(e)
    else:
        raise AssertionError("an import of a later lesson must be refused")


def test_every_command_in_the_readme_runs_a_file_that_exists():
    scripts = set(re.findall(r"(?:python|torchrun[^`\n]*?)\s+((?:\d\d_\w+/)?\w+\.py)\b", README))
    assert len(scripts) > 15
    missing = sorted(s for s in scripts if not (ROOT / s).is_file())
    assert not missing, f"README.md runs files that do not exist: {missing}"
