"""Tied weights: one tensor registered under several names, saved once and restored as one.

safetensors stores every tensor once and refuses aliases (``safetensors.torch.save_model`` drops
them), so a model whose blocks share a parameter would save without the second name and never
load again. se_inject records each alias beside the name it keeps (the recipe's ``tied`` field),
writes the kept name only, and on loading gives the alias the same tensor again: the loaded model
shares the parameter as the saved one did (one tensor, trained once, counted once).

>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
>>> model[1].weight = model[0].weight
>>> tied_names(model)
{'1.weight': '0.weight'}
"""

from __future__ import annotations

import torch
from torch import nn


def tied_names(model: nn.Module) -> dict[str, str]:
    """Every state_dict name whose tensor is also registered under an earlier name: alias -> that name."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        kept = first.setdefault(id(tensor), name)
        if kept != name:
            tied[name] = kept
    return tied


def savable_state(model: nn.Module, tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors to write: each tied tensor once (under its kept name), each contiguous; tensors that
    share memory without being the same one (views of another) are written as copies of their own."""
    state = {name: t.detach() for name, t in model.state_dict().items() if name not in tied}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state.items():
        if tensor.numel() == 0:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.device.index or 0)
        state[name] = tensor.contiguous() if key not in seen else tensor.clone(memory_format=torch.contiguous_format)
        seen.add(key)
    return state


def restore_tied(state: dict[str, torch.Tensor], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """``state`` with every alias given its kept tensor again (before ``load_state_dict``)."""
    return {**state, **{alias: state[kept] for alias, kept in tied.items() if kept in state}}


def retie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make each alias in ``model`` the same parameter (or buffer) object as its kept name, as saved."""
    for alias, kept in tied.items():
        owner_name, _, attribute = alias.rpartition(".")
        owner = model.get_submodule(owner_name)
        source_name, _, source_attribute = kept.rpartition(".")
        source = model.get_submodule(source_name)
        if attribute in owner._parameters and source_attribute in source._parameters:
            owner._parameters[attribute] = source._parameters[source_attribute]
        elif attribute in owner._buffers and source_attribute in source._buffers:
            owner._buffers[attribute] = source._buffers[source_attribute]
