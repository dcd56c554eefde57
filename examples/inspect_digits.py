"""What did the SE units learn? Train on digits, retrofit, fine-tune, then inspect and prune.

Run:  python examples/inspect_digits.py [OUT_DIR] [--threads N]   (about 25 seconds on 2 CPU cores;
seeded and deterministic at a given torch, timm, thread count and CPU instruction set)
Writes excitation.json and the PNG plots to OUT_DIR (default: a temporary directory).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from finetune_digits import SmallResNet  # noqa: E402

import se_inject  # noqa: E402
from se_inject.inspect.excitation import (  # noqa: E402
    collect,
    max_output_change,
    plot,
    prune_units,
    write_json,
)
from se_inject.train.data import digits  # noqa: E402
from se_inject.train.finetune import FinetuneConfig, evaluate, finetune  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description="what the SE units learned on digits")
    parser.add_argument("out", nargs="?", type=Path, default=None, help="where the plots go (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the README's numbers: 2)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="se_inject_inspect_"))
    runs = Path(tempfile.mkdtemp(prefix="se_inject_runs_"))
    with se_inject.reproducible(seed=0, threads=args.threads) as setting:
        data = digits(image_size=32)
        model = SmallResNet()
        finetune(model, data, runs / "plain", FinetuneConfig(epochs=2, se_epochs=0, lr=0.05, full_lr_scale=1.0))
        # the paper's initialisation (gates start near 0.5) lets the gates move further in a short run
        se_model = se_inject.inject(model, r=8, init="paper", input_size=32)
        finetune(se_model, data, runs / "se", FinetuneConfig(epochs=3, se_epochs=1, lr=0.05, full_lr_scale=1.0))

    val = DataLoader(data.val, batch_size=256)
    report = collect(se_model, val, data.classes)
    files = [write_json(report, out), *plot(report, out)]
    for unit in report.units:
        print(
            f"{unit.name:22s} C={unit.channels:4d}  mean gate {sum(unit.mean) / unit.channels:.3f}  "
            f"saturation {unit.saturation:.3f}"
        )
    threshold = sorted(u.saturation for u in report.units)[-1]  # the most saturated unit, for the demo
    pruned = prune_units(__import__("copy").deepcopy(se_model), report, threshold=threshold)
    change = max_output_change(se_model, pruned.model, val)
    acc = [evaluate(m, val, torch.device("cpu"))[1] for m in (se_model, pruned.model)]
    print(
        f"pruned {pruned.removed}: {pruned.params_saved} params (Eq. 5: {pruned.eq5_saved:.0f}); "
        f"max |output change| {change:.3g}; val acc {acc[0]:.2%} -> {acc[1]:.2%}"
    )
    print("wrote", ", ".join(str(f) for f in files))
    print(f"reproducible with {setting}")


if __name__ == "__main__":
    main()
