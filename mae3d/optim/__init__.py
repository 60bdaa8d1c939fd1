"""Optimisers and recipes: GradientConductor (multi-loss conflict resolution, Lion/trust-ratio
momentum); ``recipes`` (the hyper-parameters of every model family's optimiser and schedule);
``published`` (the published BertsWin pre-training runs as building blocks: "gcond", the
conductor run, and "adamw", its baseline)."""

from mae3d.optim.gradient_conductor import GradientConductor
from mae3d.optim.published import (
    RECIPE_NAMES,
    AdamWRecipe,
    GCondRecipe,
    PublishedRecipe,
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
    "PublishedRecipe",
    "bertswin_recipe",
    "build_recipe",
    "recipe_settings",
    "warmup_cosine_lr",
]
