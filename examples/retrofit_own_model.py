"""Retrofit SE units into your own nn.Module and read the overhead report before training.

Run:  python examples/retrofit_own_model.py
"""

import torch
import torch.nn.functional as F
from torch import nn

import se_inject


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layer1 = nn.Sequential(Block(32, 32), Block(32, 32))
        self.layer2 = nn.Sequential(Block(32, 64, 2), Block(64, 64))
        self.layer3 = nn.Sequential(Block(64, 128, 2), Block(128, 128))
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def main() -> None:
    torch.manual_seed(0)
    model = SmallResNet().eval()  # imagine it was trained

    # One call gives the new model and the report; inject()/report() give one of them each.
    result = se_inject.retrofit(model, position="standard", r=8, input_size=32)
    report = result.report
    for stage in report.stages:
        print(
            f"stage {stage.stage} {stage.size[0]}x{stage.size[1]}: N_s={stage.blocks} C_s={stage.channels} "
            f"Eq.5={stage.eq5_params:,} added={stage.added_params:,}"
        )
    totals = report.totals
    print(f"params +{totals.params_increase:.2%}, FLOPs +{totals.flops_increase:.2%}")

    se_model = result.model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        print("max |injected - original| at insertion:", (se_model(x) - model(x)).abs().max().item())
    print("units:", [name for name, m in se_model.named_modules() if isinstance(m, se_inject.SqueezeExcite)])

    # The original checkpoint still loads: only the SE weights are missing.
    missing = se_model.load_state_dict(model.state_dict(), strict=False).missing_keys
    print(f"{len(missing)} missing keys, all SE:", all(".se_" in key for key in missing))


if __name__ == "__main__":
    main()
