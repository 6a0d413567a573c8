"""Transfer-learning recipes for text classification on the Hugging Face stack.

The recipes (recipes/*.py, installed as `finetune_recipes.recipes`) import what they use from
`finetune_recipes.kit`; the command-line tools (`finetune-recipes predict`, `export`, `tune`, `compare`, `cv`,
`audit`) live in `finetune_recipes.tools`. Importing this package loads nothing heavy: `finetune-recipes ls`
and prediction from an ONNX export never pay for torch.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings

__version__ = importlib.metadata.version("finetune-recipes")


def __getattr__(name: str):
    """A recipe copied before 0.2.0 imports its names from the package itself (`from finetune_recipes import
    build_model`): it keeps working, with a warning that names the new import, for what the kit still holds."""
    # A submodule (`from finetune_recipes import tools`) is imported by the import system once this says no.
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is None:
        from . import kit

        if name in kit.__all__:
            warnings.warn(
                f"`from finetune_recipes import {name}` is the import of recipes copied before 0.2.0; write "
                f"`from finetune_recipes.kit import {name}`",
                FutureWarning,
                stacklevel=2,
            )
            return getattr(kit, name)
    raise AttributeError(
        f"module {__name__!r} has no attribute {name!r}; the recipes' names are in finetune_recipes.kit"
    )
