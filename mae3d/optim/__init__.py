"""Optimisers: GradientConductor (multi-loss conflict resolution, Lion/trust-ratio momentum) and
the published pre-training recipes built on it ("gcond": BertsWin; "adamw": the baseline)."""

from mae3d.optim.gradient_conductor import GradientConductor
from mae3d.optim.recipes import (
    RECIPE_NAMES,
    AdamWRecipe,
    GCondRecipe,
    Recipe,
    bertswin_recipe,
    build_recipe,
    recipe_settings,
    warmup_cosine_lr,
)

__all__ = [
    "RECIPE_NAMES",
    "AdamWRecipe",
    "GCondRecipe",
    "GradientConductor",
    "Recipe",
    "bertswin_recipe",
    "build_recipe",
    "recipe_settings",
    "warmup_cosine_lr",
]
