"""Seeded runs that print the same numbers again: the seeds, torch's threads and its algorithms, fixed together.

se_inject fixes a fine-tuning run's data order and augmentation (functions of the seed, the epoch and
the sample), so what is left to chance is the float arithmetic: torch's CPU kernels add up in an order
that depends on the number of threads and on the instruction set the dispatcher picks (AVX2,
AVX-512). Two runs with the same torch and timm versions, thread count and CPU capability print the
same numbers; change one of them and a short training drifts (a last-bit difference in an early step
grows), by a point of accuracy or more on the digits examples. :func:`reproducible` fixes what can be
fixed and says what the numbers depend on.

Example::

    with se_inject.reproducible(seed=0, threads=2) as setting:
        result = se_inject.finetune(model, data, "runs/digits", FinetuneConfig(epochs=2))
    print(setting)   # torch 2.14.1, timm 1.0.31, 2 threads, CPU capability AVX512
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import torch

from se_inject.errors import ConfigError


def describe_setting() -> str:
    """What a seeded run's numbers depend on besides the seed: versions, threads, the CPU's instruction set."""
    import timm

    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {capability}"
    )


@contextlib.contextmanager
def reproducible(seed: int = 0, threads: int | None = None) -> Iterator[str]:
    """Within the block: torch's and Python's seeds set to ``seed``, ``threads`` CPU threads (None: as they
    are) and deterministic algorithms only (``torch.use_deterministic_algorithms``; on CUDA the cuBLAS
    workspace setting it needs). Yields :func:`describe_setting`. Everything is set back afterwards: the
    thread count, the algorithm setting and the random states."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: expected a whole number from 0, got {seed!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024):
        raise ConfigError(f"threads: expected a thread count from 1 to 1024, got {threads!r}")
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state())
    python_state = random.getstate()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(seed)
        random.seed(seed)
        yield describe_setting()
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])
        torch.set_rng_state(before[2])
        random.setstate(python_state)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
