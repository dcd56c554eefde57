"""Does SE help a small ResNet on digits? A controlled experiment: a trained base, then a control arm
(the same network fine-tuned on the same schedule, batches and seeds, no units) against retrofit
arms, three seeds each; the accuracy difference to the control comes with its 95% interval.

Run:  python examples/finetune_digits.py [--threads N]   (2 threads by default; about a minute on 2 CPU
cores; no download). The accuracies are seeded and deterministic: they are the README's wherever
torch, timm, the thread count and the CPU's instruction set are the README's (the last line says
which); the inference times are measurements and vary.
"""

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import se_inject
from se_inject.train.config import ExperimentConfig, FinetuneConfig
from se_inject.train.data import digits
from se_inject.train.experiment import arms, experiment


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
    parser = argparse.ArgumentParser(description="a controlled SE experiment on digits")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the README's numbers: 2)")
    parser.add_argument("--latency-batch", type=int, default=16, help="batch of the latency measurement (0: none)")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="se_inject_digits_")) / "experiment"
    with se_inject.reproducible(seed=0, threads=args.threads) as setting:
        data = digits(image_size=32)
        # a trained base (two epochs of plain training, done by the experiment itself), then per seed:
        # the control and two retrofit starts, each fine-tuned one epoch (units only) + one (everything)
        result = experiment(
            SmallResNet(),
            data,
            out,
            arms(rs=[8], inits=["preserve", "zero"]),
            FinetuneConfig(epochs=2, se_epochs=1, lr=0.05, batch_size=64),
            ExperimentConfig(seeds=(0, 1, 2), base_epochs=2, latency_batch=args.latency_batch, latency_repeats=10),
        )
    print(f"base (2 epochs of plain training): val acc {result.base_accuracy:.2%}")
    for arm in result.arms:
        line = f"{arm.label:<20} val acc {arm.accuracy.mean:.2%} (sd {100 * (arm.accuracy.std or 0):.2f} points)"
        if arm.latency is not None:
            line += f", +{arm.params_added:,} weights, inference time x{arm.latency.median:.3f}"
        print(line)
    for verdict in result.verdicts():
        print(verdict)
    print(
        f"right after injection: preserve arm {result.arms[1].start_accuracy.mean:.2%}, base {result.base_accuracy:.2%}"
    )
    print(f"runs in {out}")
    print(f"reproducible with {setting} (the inference times are measured, not seeded)")


if __name__ == "__main__":
    main()
