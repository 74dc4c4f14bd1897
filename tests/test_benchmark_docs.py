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


def test_byte_rows_name_their_base_and_curve():
    """A fine-tuned row quantized afterwards names the kept row it quantizes; GPTQ calibrated on chat text and a
    quantized chat row each get a curve of their own, apart from the Wikipedia-calibrated GPTQ the goal compares to."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_bytes import family
    from bench_usable import base_config

    row = "search/modegpt,svd-llm+chatq+refine+ft128+q4+c32i4+e4:0.8"
    assert base_config(row) == "search/modegpt,svd-llm+chatq+refine+ft128:0.8"
    assert base_config("modegpt+q8rtn+e8:0.6") == "modegpt:0.6"
    assert family("dense+q4+e4:1") == "GPTQ, emb int4"
    assert family("dense+chatq+q4+e4:1") == "GPTQ on chat text, emb int4"
    assert family(row) == "search/modegpt,svd-llm+chatq+refine+ft128 + int4 + EoRA r32 int4, emb int4"


def test_kept_rows_gain_only_what_they_lack(tmp_path, monkeypatch):
    """``--answers-kept`` / ``--zeroshot-kept``: a row that lacks the measure gets it from its kept checkpoint and is
    written back at once; a row that has it, or whose checkpoint is gone, stays as it was."""
    import json

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_usable

    rows = [{"config": "a+q4:0.8", "answer_score": None}, {"config": "b:0.8", "answer_score": 0.5},
            {"config": "c:0.6"}, {"config": "d:0.6"}]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for config in ("a+q4:0.8", "b:0.8", "c:0.6"):
        ckpt = bench_usable.kept_dir(tmp_path / "keep", config)
        ckpt.mkdir(parents=True)
        (ckpt / "config.json").write_text("{}")
    seen = []
    monkeypatch.setitem(bench_usable.KEPT_EVALS, "chat",
                        ("answer_score", lambda ckpt, spec: seen.append(ckpt.name) or {"answer_score": 0.25}))
    bench_usable.add_from_kept(jsonl, tmp_path / "keep", ["a+q4:0.8", "b:0.8", "c:0.6", "d:0.6"], "chat")
    out = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert seen == ["a+q4_0.8", "c_0.6"]
    assert [r.get("answer_score") for r in out] == [0.25, 0.5, 0.25, None]
