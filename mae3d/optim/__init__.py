"""Optimisers: GradientConductor (multi-loss conflict resolution, Lion/trust-ratio momentum)."""

from mae3d.optim.gradient_conductor import GradientConductor

__all__ = ["GradientConductor"]
