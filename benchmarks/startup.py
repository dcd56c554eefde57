"""How long ``se-inject --help`` takes against ``python -c "import torch"``: the CLI must answer without
loading torch (the budget: under 0.3x of torch's import).

Both are run as fresh processes, interleaved (each round runs every command once, in an order that
rotates), so both see the same machine state; the figure is the median of the per-round ratios
with the 25th-75th percentile of those ratios as its spread.

    python benchmarks/startup.py                 # 15 rounds, about a minute
    python benchmarks/startup.py --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "se-inject --help": [sys.executable, "-m", "se_inject", "--help"],
    "se-inject inject --help": [sys.executable, "-m", "se_inject", "inject", "--help"],
}


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    names = list(COMMANDS)
    for name in names:  # warm the file cache
        timed(COMMANDS[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            times[name].append(timed(COMMANDS[name]))
    base = times["import torch"]
    print(f"{'command':<26} {'median s':>9}  ratio to import torch, median [25%, 75%]")
    for name in names:
        ratios = [t / b for t, b in zip(times[name], base, strict=True)]
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        print(f"{name:<26} {statistics.median(times[name]):>9.3f}  {median:.3f} [{q1:.3f}, {q3:.3f}]")


if __name__ == "__main__":
    main()
