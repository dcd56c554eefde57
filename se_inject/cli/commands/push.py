"""``se-inject push SAVED REPO``: share a saved retrofit on the Hugging Face Hub, with a model card."""

from __future__ import annotations

import typer

from se_inject.cli import options as opt
from se_inject.cli.render import console


def command(
    saved: str = typer.Argument(..., help="a directory se_inject saved (--save, finetune --out, prune-se --out)"),
    repo: str = typer.Argument(..., help="the Hub repository, owner/name (created if it does not exist)"),
    save_weights: str = opt.finetune_option("save_weights"),
    base: str | None = opt.base_option(),
    revision: str | None = typer.Option(None, "--revision", help="the branch to push to (default: main)"),
    private: bool = typer.Option(False, "--private", help="create the repository private"),
    trust_code: bool = opt.trust_code_option(),
) -> None:
    """Push a saved retrofit to the Hub: recipe, weights, config.json and a model card with the overhead report.

    The token is huggingface_hub's (HF_TOKEN, or `hf auth login`). Load it back with
    se_inject.load('hf-hub:OWNER/NAME').
    """
    from se_inject.io.hub import push_to_hub
    from se_inject.io.remote import check_repo_id

    check_repo_id(repo)  # before anything is loaded
    url = push_to_hub(
        saved, repo, weights=save_weights, base=base, revision=revision, private=private, trust_code=trust_code
    )
    console().print(f"pushed {saved} to {url}; load with se_inject.load('hf-hub:{repo}')")
