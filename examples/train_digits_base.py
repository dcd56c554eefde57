"""Train a plain timm resnet18 on the bundled digits and save its weights: the trained model that
the README's fine-tuning demo retrofits (an SE-only phase on an untrained backbone learns nothing).

Run:  python examples/train_digits_base.py [OUT.pth]   (default runs/resnet18_digits.pth; about a
minute on 2 CPU cores; no download). Then:

    se-inject finetune resnet18 --checkpoint runs/resnet18_digits.pth --num-classes 10 \\
        --data digits --out runs/digits --epochs 2 --se-epochs 1 --r 8
"""

import sys
import tempfile
from pathlib import Path

import torch

import se_inject
from se_inject.train.data import load_data, model_data_config
from se_inject.train.finetune import FinetuneConfig, finetune


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/resnet18_digits.pth")
    torch.manual_seed(0)
    model = se_inject.load_model("resnet18", num_classes=10)
    data = load_data("digits", config=model_data_config(model))  # normalised as resnet18 expects
    with tempfile.TemporaryDirectory() as run:  # the run's own checkpoints are not needed here
        result = finetune(
            model, data, Path(run) / "base", FinetuneConfig(epochs=2, se_epochs=0, lr=0.05, full_lr_scale=1.0)
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    print(f"resnet18 trained on digits: val acc {result.accuracy['after fine-tuning']:.2%}; weights in {out}")


if __name__ == "__main__":
    main()
