"""Where code runs: the device a run or a measurement asks for, and its process under torchrun.

Shared by training (``finetune``, ``experiment``) and measurement (``bench``, ``compare``): one rule for
what ``--device auto`` means and for which GPU a torchrun process takes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from se_inject.errors import ConfigError


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("SE_INJECT_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
        if backend == "gloo":  # processes share the CPU cores: no oversubscription
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return dist.get_rank(), dist.get_world_size()


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu`` or ``cuda`` as a torch.device; under torchrun a CUDA
    process takes the GPU of its ``LOCAL_RANK``."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: {name!r} is not one of auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)
