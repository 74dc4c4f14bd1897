"""Every shipped recipe is valid and names registered methods and allocators."""
from pathlib import Path

import pytest

from compress.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem and (recipe.stages or recipe.quantize is not None)  # or quantization alone
    assert all(0 < s.param_ratio <= 1 for s in recipe.stages if s.param_ratio is not None)
