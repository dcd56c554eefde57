"""The version of se_inject: one place, read by the package, its recipes and pyproject.toml."""

__version__ = "0.1.0"
