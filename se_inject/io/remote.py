"""Names of shared retrofits: ``hf-hub:org/name[@revision]`` and ``local-dir:PATH``.

``hf-hub:`` resolves through huggingface_hub's cache (``HF_HUB_OFFLINE=1`` reads the cache alone),
fetching only the files a saved directory holds (recipe, weights, config, model card); nothing in the
repository is imported or run: :func:`se_inject.load` reads it as it reads any saved directory.
"""

from __future__ import annotations

from pathlib import Path

from se_inject.errors import ArtifactError, ConfigError, one_line
from se_inject.io.files import as_path
from se_inject.io.layout import CONFIG_FILE, MODEL_CARD_FILE, RECIPE_FILE, WEIGHTS_FILE

HUB_PREFIX, LOCAL_PREFIX = "hf-hub:", "local-dir:"
_REPOSITORY_FILES = [RECIPE_FILE, WEIGHTS_FILE, CONFIG_FILE, MODEL_CARD_FILE]
MAX_REPO_ID = 96  # the Hub's limit on owner/name


def is_shared_name(name: object) -> bool:
    """Whether ``name`` is an ``hf-hub:`` or ``local-dir:`` name rather than a directory path."""
    return isinstance(name, str) and name.startswith((HUB_PREFIX, LOCAL_PREFIX))


def resolve(name: str) -> Path:
    """The local directory an ``hf-hub:org/name[@rev]`` or ``local-dir:PATH`` name stands for; a Hub name
    through huggingface_hub's cache (offline when ``HF_HUB_OFFLINE`` is set)."""
    if name.startswith(LOCAL_PREFIX):
        return as_path(name.removeprefix(LOCAL_PREFIX), "local-dir")
    repo_id, _, revision = name.removeprefix(HUB_PREFIX).partition("@")
    check_repo_id(repo_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=_REPOSITORY_FILES))
    except LocalEntryNotFoundError:
        raise ArtifactError(
            f"{name}: not in the local Hugging Face cache and the Hub cannot be reached (offline, or no network); "
            "download it on a machine with a network, or give the directory"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise ArtifactError(f"{name}: cannot be fetched from the Hub: {one_line(err, 160)}") from None


def check_repo_id(repo_id: str) -> None:
    owner, slash, repo = repo_id.partition("/")
    parts_ok = all(p and all(c.isalnum() or c in "-_." for c in p) and not p.startswith(".") for p in (owner, repo))
    if not slash or "/" in repo or len(repo_id) > MAX_REPO_ID or not parts_ok:
        raise ConfigError(f"repository {repo_id!r}: expected owner/name (letters, digits, - _ .), e.g. me/se-resnet50")
