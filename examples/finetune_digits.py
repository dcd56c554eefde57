"""Train a small ResNet on digits, retrofit SE units (preserve init), fine-tune, print the accuracy at each step.

Run:  python examples/finetune_digits.py   (about 15 seconds on 2 CPU cores; no download)
"""

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import se_inject
from se_inject.train.data import digits
from se_inject.train.finetune import FinetuneConfig, evaluate, finetune


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride > 1
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.down(x))


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layers = nn.Sequential(Block(32, 32), Block(32, 64, 2), Block(64, 64), Block(64, 128, 2))
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def main() -> None:
    torch.manual_seed(0)
    data = digits(image_size=32)
    runs = Path(tempfile.mkdtemp(prefix="se_inject_digits_"))

    # 1. a trained model to start from: two epochs of plain training
    model = SmallResNet()
    plain = finetune(model, data, runs / "plain", FinetuneConfig(epochs=2, se_epochs=0, lr=0.05, full_lr_scale=1.0))
    print(f"1. trained ResNet:           val acc {plain.accuracy['after fine-tuning']:.2%}")

    # 2. retrofit SE units; with the preserve initialisation nothing changes yet
    se_model = se_inject.inject(model, position="standard", r=8, input_size=32)
    val = torch.utils.data.DataLoader(data.val, batch_size=256)
    print(
        f"2. right after injection:    val acc {evaluate(se_model, val, torch.device('cpu'))[1]:.2%} "
        f"(max |output change| {se_inject.check_outputs(model, se_model, input_size=32):.1g})"
    )

    # 3. fine-tune: one epoch training the SE units only, then one epoch of everything at a lower rate
    result = finetune(se_model, data, runs / "se", FinetuneConfig(epochs=2, se_epochs=1, lr=0.05), original=model)
    for record in result.history:
        print(f"3. epoch {record['epoch']} ({record['phase']:>4}):         val acc {record['val_acc']:.2%}")
    print("accuracy:", {k: None if v is None else round(v, 4) for k, v in result.accuracy.items()})
    print(f"saved in {result.out}")


if __name__ == "__main__":
    main()
