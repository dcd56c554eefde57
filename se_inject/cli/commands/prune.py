"""``se-inject prune-se SAVED``: replace units whose gate is nearly constant by their mean scale."""

from __future__ import annotations

import typer

from se_inject.cli import options as opt
from se_inject.cli.commands.inspect import IMAGE_SIZE_HELP, SAVED_HELP, VAL_DATA_HELP, threshold_option
from se_inject.cli.render import console


def command(
    saved: str = typer.Argument(..., help=SAVED_HELP),
    data: str = typer.Option(..., "--data", help=VAL_DATA_HELP),
    out: str = typer.Option(..., "--out", help="where the pruned model is saved"),
    unit_names: str | None = typer.Option(
        None, "--unit-names", help="names of the units to prune (default: those at --threshold)"
    ),
    threshold: float = threshold_option("saturation from which a unit is pruned"),
    input_size: int | None = opt.input_size_option(IMAGE_SIZE_HELP),
    force: bool = typer.Option(False, "--force", help="replace an existing --out"),
    trust_code: bool = opt.trust_code_option(),
    base: str | None = opt.base_option(),
) -> None:
    """Replace SE units whose gate is nearly constant by their mean per-channel scale; report the cost."""
    from se_inject.inspect.excitation import prune
    from se_inject.io.saving import load, save
    from se_inject.train.data import load_data, model_data_config

    chosen = opt.parse_names(unit_names, "--unit-names") or None
    opt.check_save_target(out, force, "--out")
    model = load(saved, base=base, trust_code=trust_code)
    result = prune(model, load_data(data, input_size, model_data_config(model)), chosen, threshold)
    save(result.model, out, force=force)
    console().print(
        f"removed {len(result.removed)} unit(s): {', '.join(result.removed) or '-'}; params saved {result.params_saved:,} "
        f"(Eq. 5: {result.eq5_saved:,.0f}); max |output change| {result.max_output_change:.3g}; "
        f"val acc {result.accuracy_before:.2%} -> {result.accuracy_after:.2%}; saved to {out}"
    )
