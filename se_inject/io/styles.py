"""Style files: SE conventions by name, read as data.

The built-in styles ship in ``rules/styles/`` (``paper``, ``timm``, ``efficientnet``,
``mobilenetv3``, ``regnety``); :func:`load_style_file` adds a user's file of the same form::

    [[style]]
    name = "my_se"
    description = "..."
    options = { r = 8, act = "silu", gate = "hard_sigmoid", bias = true }

The registry and the validation of each option belong to :mod:`se_inject.config`; this module
only reads files, as :mod:`se_inject.placement.rules` does for rules (a regular UTF-8 file of at
most 1 MiB, nothing executed).
"""

from __future__ import annotations

from pathlib import Path

from se_inject.config import Style, parse_styles, register_style
from se_inject.errors import ConfigError
from se_inject.io.files import read_text_file

MAX_STYLE_FILE_BYTES = 1 << 20


def load_style_file(path: str | Path) -> list[Style]:
    """Register the styles of ``path`` (checked completely first: a bad file registers nothing).

    Example::

        se_inject.load_style_file("my_styles.toml")
        se_inject.inject(model, style="my_se")
    """
    text = read_text_file(path, limit=MAX_STYLE_FILE_BYTES, what="style file", error=ConfigError)
    found = parse_styles(text, str(path))
    try:
        register_style(*found)  # all or none
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return found
