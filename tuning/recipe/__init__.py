"""The recipe for choosing hyperparameters, automated (``schedtune recipe``).

- ``recipe``: the steps and ``Recipe``, which runs them
- ``probes``: steps 1-3, short pure-PyTorch probes of one training config
- ``specs``: the search-space files the recipe derives (coarse, refine, recommendation)
"""
from tuning.recipe.recipe import STEPS, Recipe

__all__ = ["STEPS", "Recipe"]
