"""The identity of a retrofit's base: a digest of every tensor the model had before units went in.

Recorded in the recipe at injection (before any training), it lets a save hold only what the
retrofit added or changed (``weights="units"``, peft's adapter idea), and a load check that the base
it is given is the one the units were made for. A digest covers a tensor's dtype, shape and bytes;
the base's digest covers every tensor's name and digest, so two bases differ in it exactly when
some tensor differs.

>>> import torch
>>> record = base_record({"w": torch.zeros(2)})
>>> record["sha256"] == base_record({"w": torch.zeros(2)})["sha256"] != base_record({"w": torch.ones(2)})["sha256"]
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (on the CPU, contiguous)."""
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    digest = hashlib.sha256(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    if flat.numel():
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def combined_digest(tensors: Mapping[str, str]) -> str:
    """SHA-256 over the names and digests of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(f"{name}\0{tensors[name]}\n".encode())
    return digest.hexdigest()


def base_record(state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """What a recipe records of the base: its digest and each tensor's; None for a model without
    weights (on the meta device)."""
    if any(t.is_meta for t in state.values()):
        return None
    tensors = {name: tensor_digest(t) for name, t in state.items()}
    return {"sha256": combined_digest(tensors), "tensors": tensors}


def changed_since_base(state: Mapping[str, torch.Tensor], base: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` that the base did not have, or had with other values: what a units-only
    save holds."""
    recorded: Mapping[str, str] = base["tensors"]
    return {name: t for name, t in state.items() if name not in recorded or tensor_digest(t) != recorded[name]}


def first_difference(given: Mapping[str, str], recorded: Mapping[str, str]) -> str:
    """The first tensor name in which two bases' digests differ, described in a few words."""
    for name in sorted(set(given) | set(recorded)):
        if name not in given:
            return f"'{name}' is missing"
        if name not in recorded:
            return f"'{name}' is not in the recorded base"
        if given[name] != recorded[name]:
            return f"'{name}' differs"
    return "no tensor differs"
