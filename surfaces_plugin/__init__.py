"""Surfaces: a maubot plugin that makes Matrix a home for AI agent conversations."""

from .plugin import SurfacesPlugin

__all__ = ["SurfacesPlugin"]
