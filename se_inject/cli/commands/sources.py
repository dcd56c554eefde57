"""``se-inject sources``: the kinds of model spec MODEL can be, from their registry."""

from __future__ import annotations

from dataclasses import asdict

from se_inject.cli import options as opt
from se_inject.cli.render import console, print_json, text_table


def command(as_json: bool = opt.json_option("source kinds")) -> None:
    """List the kinds of model spec (timm names, torchvision:NAME, your code, and any registered since):
    how each is written and whether building it runs your Python code (a saved model naming such a
    source loads only with --trust-code)."""
    from se_inject.io.sources import describe_sources

    infos = describe_sources()
    if as_json:
        print_json([asdict(info) for info in infos])
        return
    kinds = text_table("Model sources (MODEL)", ("kind", "written", "example", "runs your code", "builds"))
    for info in infos:
        kinds.add_row(info.name, info.syntax, info.example, "yes" if info.runs_code else "no", info.description)
    console().print(kinds)
