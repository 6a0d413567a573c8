"""Publishing a run's output directory on the Hugging Face Hub: checked before training, pushed after saving.

The token comes from --hub_token or the cached login and is never written anywhere (the resolved config,
trackers and the card leave it out)."""

from __future__ import annotations

import os

from huggingface_hub import HfApi, get_token

from ..config import TrainingArguments
from ..errors import UserError, first_line

# What stays local: checkpoints to resume from, the run's bookkeeping, tracker logs, a save in progress.
NOT_UPLOADED = ["checkpoints/**", ".finetune_recipes*", ".partial_outputs/**", "finetune_recipes/**", "*.lock"]


def hub_token(args: TrainingArguments) -> str | None:
    return args.hub_token or get_token()


def check_hub(args: TrainingArguments) -> None:
    """Before any training: a model id, credentials, and a Hub that answers with who they belong to."""
    if not args.push_to_hub:
        return
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise UserError("push_to_hub needs the Hub, and HF_HUB_OFFLINE is set; unset it or drop --push_to_hub")
    token = hub_token(args)
    if not token:
        raise UserError("push_to_hub needs Hub credentials: run `hf auth login`, or pass --hub_token")
    try:
        HfApi().whoami(token=token)
    except Exception as error:  # offline, a bad token, a proxy: all mean the push at the end would fail
        reason = f"{error.__class__.__name__}: {first_line(error)}".replace(token, "***")
        raise UserError(f"cannot reach the Hub as the given user ({reason}); check the network and token") from None


def push(folder: str, args: TrainingArguments, message: str, entries: set[str]) -> str:
    """create_repo (private when asked) + upload_folder of the run's `entries` (what the manifest says runs
    wrote: never a file of the user's) without checkpoints and bookkeeping; returns the repo's URL."""
    api, token = HfApi(), hub_token(args)
    try:
        url = api.create_repo(args.hub_model_id, private=args.hub_private_repo, exist_ok=True, token=token)
        api.upload_folder(
            repo_id=args.hub_model_id,
            folder_path=folder,
            commit_message=message,
            allow_patterns=[p for e in sorted(entries) for p in (e, f"{e}/**")],
            ignore_patterns=NOT_UPLOADED,
            token=token,
        )
    except Exception as error:
        reason = f"{error.__class__.__name__}: {first_line(error)}".replace(token or "\0", "***")
        raise UserError(
            f"the model is saved in {folder}, but the push to {args.hub_model_id} failed ({reason}); "
            f"push it later with `hf upload {args.hub_model_id} {folder}`"
        ) from None
    return str(url)
