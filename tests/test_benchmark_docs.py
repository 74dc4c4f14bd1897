"""docs/benchmarks.md shows exactly what the raw results in docs/results/ hold: every marked table is re-rendered
from its raw file by scripts/render_tables.py (with the measuring script's own ``markdown``) and compared."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_marked_tables_equal_their_raw_files():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_tables.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, "docs/benchmarks.md differs from docs/results/ (run scripts/render_tables.py " \
                                 "--write after measuring):\n" + proc.stdout[-4000:] + proc.stderr[-2000:]


def test_every_marked_table_has_rows():
    sys.path.insert(0, str(ROOT / "scripts"))
    import render_tables

    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    for name in render_tables.SECTIONS:
        body = doc[doc.index(f"<!-- {name} -->"):doc.index(f"<!-- /{name} -->")]
        assert body.count("\n|") >= 3, name  # header, rule and at least one measured row
