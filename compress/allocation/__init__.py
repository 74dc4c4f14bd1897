"""Rank allocation: turn a stage's budget into a rank per targeted matrix (the step between statistics and
decomposition).

``uniform`` needs only the shapes (``lrc plan`` shows it from the config). The global allocators see every targeted
matrix's spectrum first and meet the stage's ``param_ratio`` over all of them: ``energy`` and ``loss`` use the
method's own (e.g. whitened) spectrum from a statistics pass over the dense model, ``welore`` the plain weight's.
Each is ``fn(stage, rows, spectra, options)`` and sets ``rank``/``factorize``/``note`` on the rows.
"""
from __future__ import annotations

from .energy import energy
from .loss import LossOptions, loss
from .sensitivity import SensitivityOptions, sensitivity
from .uniform import uniform
from .welore import WeLoreOptions, welore

ALLOCATORS = {"uniform": uniform, "energy": energy, "welore": welore, "loss": loss, "sensitivity": sensitivity}
OPTIONS = {"welore": WeLoreOptions, "loss": LossOptions, "sensitivity": SensitivityOptions}
# what a global allocator reads per matrix: the method's spectrum, the weight's, or ASVD's perplexity sweep
SPECTRUM = {"energy": "method", "loss": "method", "welore": "weights", "sensitivity": "sweep"}
# what reading it costs, in words (``lrc methods``), from SPECTRUM so the two cannot disagree
NEEDS = {None: "shapes only", "method": "method spectra (statistics pass)", "weights": "weight spectra (data-free)",
         "sweep": "perplexity sweep (per matrix and ratio)"}
# one line per allocator for ``lrc methods``: several are methods of their own in the literature (WeLore)
DESCRIPTIONS = {
    "uniform": "the same kept ratio for every matrix (the SVD-LLM and ASVD default)",
    "energy": "one global fraction of spectral energy kept in every matrix, solved for the budget",
    "welore": "WeLore (Jaiswal et al., arXiv 2407.11239): one global threshold on normalised weight singular "
              "values; matrices that would not save parameters stay dense",
    "loss": "SVD-LLM V2 (Wang et al., arXiv 2503.12340): per module type, ranks redistributed by whitened "
            "truncation loss",
    "sensitivity": "ASVD's STRS (Yuan et al., arXiv 2312.05821): ratios chosen from each matrix's calibration "
                   "perplexity at every candidate ratio",
}


def needs(name: str) -> str:
    """What allocator ``name`` reads before it can decide a rank (``lrc methods``)."""
    return NEEDS[SPECTRUM.get(name)]


def allocate(stage, rows) -> None:
    """Shape-only step of ``make_plan``: uniform ranks now; global allocators wait for ``allocate_global``."""
    if stage.allocator == "uniform":
        uniform(stage, rows)
    else:
        for r in rows:
            r.rank, r.factorize, r.note = None, None, f"{stage.allocator} allocator (needs spectra)"


def allocate_global(stage, rows, spectra) -> None:
    ALLOCATORS[stage.allocator](stage, rows, spectra, stage.allocator_options)
