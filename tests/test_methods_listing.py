"""``lrc methods`` lists the rank allocators too (a user looking for WeLore must find it), each with what it reads
and a one-line description citing its paper, all from the allocation registry."""
from typer.testing import CliRunner

from compress.allocation import ALLOCATORS, DESCRIPTIONS, needs
from compress.cli import app
from compress.recipe import StageConfig


def test_every_allocator_is_described_in_the_registry():
    assert set(ALLOCATORS) == set(DESCRIPTIONS) and len(ALLOCATORS) >= 5
    for name, entry in ALLOCATORS.items():  # the recipe field accepts the registered names (Linear ones here)
        if "linear" in entry.unit_kinds:
            assert StageConfig(method="svd-llm", param_ratio=0.5, allocator=name).allocator == name
    assert needs("uniform") == "shapes only" and needs("welore").startswith("weight spectra")
    assert needs("energy") == needs("loss") and needs("energy").startswith("method spectra")
    assert needs("sensitivity").startswith("perplexity sweep")


def test_lrc_methods_lists_the_allocators():
    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    rows = {ln.split("│")[1].strip(): ln for ln in res.output.splitlines() if ln.startswith("│ ")}
    for name in ALLOCATORS:
        assert name in rows and needs(name) in rows[name], res.output
    assert "svd-llm" in rows  # the methods table is still there
    for cited in ("WeLore", "2407.11239", "SVD-LLM V2", "2503.12340", "STRS", "2312.05821"):
        assert cited in res.output
