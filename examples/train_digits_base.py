"""Train a plain timm resnet18 on the bundled digits and save its weights: the trained model that
the README's fine-tuning demo retrofits (an SE-only phase on an untrained backbone learns nothing).

Run:  python examples/train_digits_base.py [OUT.pth] [--threads N]   (default runs/resnet18_digits.pth
and 2 threads; about 20 s on 2 CPU cores; no download). Seeded and deterministic: it prints the
README's numbers wherever torch, timm, the thread count and the CPU's instruction set are the
README's (the last line says which). Then:

    se-inject finetune resnet18 --checkpoint runs/resnet18_digits.pth --num-classes 10 \\
        --data digits --out runs/digits --epochs 2 --se-epochs 1 --r 8
"""

import argparse
import tempfile
from pathlib import Path

import torch

import se_inject
from se_inject.train.data import load_data, model_data_config
from se_inject.train.finetune import FinetuneConfig, finetune


def main() -> None:
    parser = argparse.ArgumentParser(description="train resnet18 on digits (the README's trained base)")
    parser.add_argument("out", nargs="?", type=Path, default=Path("runs/resnet18_digits.pth"))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the README's numbers: 2)")
    args = parser.parse_args()
    with se_inject.reproducible(seed=0, threads=args.threads) as setting:
        model = se_inject.load_model("resnet18", num_classes=10)
        data = load_data("digits", config=model_data_config(model))  # normalised as resnet18 expects
        with tempfile.TemporaryDirectory() as run:  # the run's own checkpoints are not needed here
            result = finetune(
                model, data, Path(run) / "base", FinetuneConfig(epochs=2, se_epochs=0, lr=0.05, full_lr_scale=1.0)
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"resnet18 trained on digits: val acc {result.accuracy['after fine-tuning']:.2%}; weights in {args.out}")
    print(f"reproducible with {setting}")


if __name__ == "__main__":
    main()
