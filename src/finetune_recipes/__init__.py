"""finetune_recipes: transfer-learning recipes for text classification."""
