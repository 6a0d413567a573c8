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

# The names of a 0.1 recipe's imports that 0.2.0 replaced, with what replaced them: that recipe's loop no longer
# fits the kit, so its copy is made again. A record of 0.1, not a list to keep up: new names go in kit.py alone.
REPLACED_IN_0_2 = {
    "Validation": "evaluate, record_evaluation, calibrate and run_results, with resume_state's EarlyStopping",
    "start_training": "resume_state, claim_outputs and start_trackers",
    "epoch_batches": "train_batches",
}


def __getattr__(name: str):
    """Code written before 0.2.0 imports the recipes' names from the package itself (`from finetune_recipes import
    build_model`): it keeps working, with a warning that names the new import, for what the kit still holds. A
    recipe copied from 0.1 also imports names its loop used that 0.2.0 replaced: one ImportError says to copy the
    recipe again."""
    if name in REPLACED_IN_0_2:
        raise ImportError(
            f"finetune_recipes.{name} (a recipe copied from 0.1) was replaced in 0.2.0 by "
            f"{REPLACED_IN_0_2[name]} in finetune_recipes.kit, and the loop with it; copy the recipe again "
            "(finetune-recipes cp RECIPE DEST) and carry your edits over"
        )
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
