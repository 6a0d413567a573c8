"""Recipes: one script per transfer-learning strategy."""
