"""Uploads of a trained model and its checkpoints to the Hugging Face Hub."""

from pathlib import Path

# What the model repo never receives: checkpoints (uploaded separately with --push_checkpoints), logs, hidden files.
HUB_IGNORE: list[str] = ["checkpoints/*", "checkpoints/**", "runs/*", "runs/**", ".*"]


def make_hub_api(token: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def push_folder(api, repo_id: str, folder: Path, message: str, path_in_repo: str | None = None, ignore=None):
    """`api.upload_folder` of `folder` (to `path_in_repo`), without the files matching `ignore`."""
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        path_in_repo=path_in_repo,
        commit_message=message,
        ignore_patterns=ignore,
    )


__all__ = ["HUB_IGNORE", "make_hub_api", "push_folder"]
