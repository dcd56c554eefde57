"""Twins of any timm network with an SE-like gate: the network built as timm builds it, its plain
sibling (every attention module replaced by ``nn.Identity``), the sibling retrofitted with options,
the twin's attention weights copied into the units, and both compared block by block in float64.

Used by the fast suite (tests/test_twins.py, one model per family) and by the sweep over every
SE-bearing model (benchmarks/twins.py). BatchNorm statistics and attention weights are random, the
units use the published start (``init="paper"``: a scaled preserve gate could not pass).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
from conftest import randomize_batchnorm
from torch import nn

import se_inject
from se_inject.units.base import ChannelUnit

SIZE = 64
X = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def input_of(size: int) -> torch.Tensor:
    """The input the twins are compared at: 2 random images of ``size`` x ``size``, the same every run."""
    return (
        X
        if size == SIZE
        else torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    )


def twin_size(model: nn.Module) -> int:
    """The smallest input a timm model takes: 64, or its declared minimum (attention over fixed windows),
    or its only size (``fixed_input_size``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size"):
        return int(cfg["input_size"][-1])
    return max(SIZE, int((cfg.get("min_input_size") or (3, SIZE, SIZE))[-1]))


def attention_classes() -> tuple[type, ...]:
    """timm's SE-like modules: each computes ``x * gate(f(pool(x)))`` from its input alone."""
    from timm.layers.cbam import CbamModule, LightCbamModule
    from timm.layers.eca import CecaModule, EcaModule
    from timm.layers.global_context import GlobalContext
    from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models.hgnet import EseModule
    from timm.models.senet import SEModule as LegacySEModule
    from torchvision.ops import SqueezeExcitation

    return (
        SqueezeExcitation,
        SEModule,
        EffectiveSEModule,
        EcaModule,
        CecaModule,
        GlobalContext,
        CbamModule,
        LightCbamModule,
        SqueezeExcite,
        EseModule,
        LegacySEModule,
    )


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    kinds = attention_classes()
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


class NotReproduced(AssertionError):
    """Why a twin is not reproduced: the reason the sweep's table gives."""


@dataclass
class TwinResult:
    units: int
    worst_block: float
    output: float


def twin_and_plain(build: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(0)
    twin = build().double().eval()
    randomize_batchnorm(twin, seed=1)
    attention = attention_modules(twin)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in attention.values():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)
        for p in twin.parameters():  # zero-initialised gains (NFNet's skipinit, layer scales) would hide a branch
            if p.numel() and not p.any():
                p.copy_(torch.empty(p.shape, dtype=p.dtype).uniform_(0.5, 1.5, generator=generator))
    plain = copy.deepcopy(twin)
    for name in attention:
        plain.set_submodule(name, nn.Identity())
    return twin, plain, attention


def _state(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")]


def check_layout(unit: nn.Module, module: nn.Module, where: str) -> None:
    """NotReproduced unless the unit holds tensors of the twin module's sizes, in its order."""
    mine, theirs = _state(unit), _state(module)
    if [v.numel() for _, v in mine] != [v.numel() for _, v in theirs]:
        shapes = [tuple(v.shape) for _, v in mine], [tuple(v.shape) for _, v in theirs]
        raise NotReproduced(f"{where}: unit tensors {shapes[0]} against the twin's {shapes[1]}")


def copy_twin_weights(unit: nn.Module, module: nn.Module, where: str) -> None:
    """The twin's attention weights into the unit, tensor by tensor in order (1x1 convs into linear
    layers); a different count or shape is a unit built differently from the twin's."""
    check_layout(unit, module, where)
    mine, theirs = _state(unit), _state(module)
    with torch.no_grad():
        for (_, a), (_, b) in zip(mine, theirs, strict=True):
            a.copy_(b.reshape(a.shape))


def _kept(args: tuple, out: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    """A block's inputs and output as they were: copies (torchvision's MBConv adds its input to the block's
    output in place after the block returned it; RDNet appends to the list of features it passed)."""
    return tuple(_copied(a) for a in args), out.clone()


def _copied(value: object) -> object:
    """Tensors cloned, lists and tuples copied (RDNet's dense stage appends to the list it passed)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list | tuple):
        return type(value)(_copied(v) for v in value)
    return value


def _block_io(model: nn.Module, blocks: list[str], x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    seen: dict[str, tuple[tuple, torch.Tensor]] = {}
    handles = [
        model.get_submodule(b).register_forward_hook(lambda m, args, out, b=b: seen.update({b: _kept(args, out)}))
        for b in blocks
    ]
    try:
        with torch.no_grad():
            return model(x), seen
    finally:
        for handle in handles:
            handle.remove()


def scaled_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| over the scale of ``expected`` (its largest magnitude, at least 1)."""
    if got.shape != expected.shape:
        raise NotReproduced(f"output shapes differ: {tuple(got.shape)} against {tuple(expected.shape)}")
    return ((got - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item()


def _twin_block(unit: str, parents: list[str]) -> str | None:
    """The twin's block a unit lies in: the longest of ``parents`` its name is inside (a unit may sit in a
    submodule of the block, as the rewrite puts it in the smallest module around its place)."""
    inside = [p for p in parents if unit.startswith(p + ".")]
    if inside:
        return max(inside, key=len)
    owner = unit.rpartition(".")[0]
    within = [p for p in parents if p.startswith(owner + ".")]  # the twin's block is inside the unit's owner
    return within[0] if len(within) == 1 else owner


def build_model(name: str) -> nn.Module:
    """The model ``name`` as its library builds it: ``torchvision:NAME`` or a timm name."""
    if name.startswith("torchvision:"):
        import torchvision

        model = torchvision.models.get_model(name.partition(":")[2])
        # the smallest input torchvision declares (MaxViT's windows: 224), where twin_size looks for timm's
        weights = torchvision.models.get_model_weights(name.partition(":")[2]).DEFAULT
        model.pretrained_cfg = {"min_input_size": (3, *weights.meta["min_size"])}
        return model
    return timm.create_model(name)


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """The model on the meta device: shapes only, built in no time whatever its size."""
    try:
        with torch.device("meta"):
            return build()
    except NotImplementedError:  # torchvision's RegNets compute their widths with tensors
        return build().to("meta")


def plain_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """The plain sibling on the meta device."""
    model = on_meta(build)
    for name in attention_modules(model):
        model.set_submodule(name, nn.Identity())
    return model


def twin_blocks(build: Callable[[], nn.Module], options: dict, parents: list[str]) -> list[str]:
    """``include=`` for a family that picks its SE blocks by index: the blocks (as the report names them)
    of the places the options find that lie in a block where the twin has SE (planned on the meta device)."""
    found = se_inject.retrofit(plain_on_meta(build), **options).plan.units
    return sorted({u.module for u in found if _twin_block(u.module + ".", parents) in parents})


def _matched(units: dict[str, nn.Module], attention: dict[str, nn.Module], parents: list[str]) -> dict:
    """The unit in each block where the twin has SE (NotReproduced if there is not exactly one each)."""
    by_parent = {_twin_block(n, parents): m for n, m in units.items()}
    if len(units) != len(attention) or sorted(by_parent) != parents:
        missing = sorted(set(parents) - set(by_parent))
        extra = sorted(str(b) for b in set(by_parent) - set(parents))
        raise NotReproduced(
            f"{len(units)} units for {len(attention)} SE modules"
            + (f"; none in {missing[0]}" if missing else "")
            + (f"; one in {extra[0]}" if extra else "")
        )
    return by_parent


def placed_on_meta(build: Callable[[], nn.Module], options: dict, by_index: bool = False) -> int:
    """For a model too large to run here: the retrofit planned on the meta device puts one unit in each
    block where the twin has SE, each holding tensors of the twin's module's sizes (NotReproduced if not);
    the number of units. Places and widths, not values: a weaker check than :func:`reproduce`."""
    twin = on_meta(build)
    attention = attention_modules(twin)
    parents = sorted({name.rpartition(".")[0] for name in attention})
    options = {"init": "paper", "input_size": twin_size(twin), **options}
    if by_index:
        options["include"] = twin_blocks(build, options, parents) or parents
    injected = se_inject.retrofit(plain_on_meta(build), **options).model
    units = {n: m for n, m in injected.named_modules() if isinstance(m, ChannelUnit)}
    by_parent = _matched(units, attention, parents)
    for name, module in attention.items():
        check_layout(by_parent[name.rpartition(".")[0]], module, name)
    return len(units)


def reproduce(build: Callable[[], nn.Module], options: dict, by_index: bool = False) -> TwinResult:
    """The retrofit of the twin's plain sibling with ``options`` against the twin (NotReproduced if
    the units differ in number, place or shape); ``by_index``: in the blocks where the twin has SE."""
    twin, plain, attention = twin_and_plain(build)
    if not attention:
        raise NotReproduced("no SE-like module in the twin")
    parents = sorted({name.rpartition(".")[0] for name in attention})
    size = twin_size(twin)
    x = input_of(size)
    options = {"init": "paper", "input_size": size, **options}
    if by_index:
        options["include"] = twin_blocks(build, options, parents) or parents
    result = se_inject.retrofit(plain, **options)
    injected = result.model.double().eval()
    units = {n: m for n, m in injected.named_modules() if isinstance(m, ChannelUnit)}
    by_parent = _matched(units, attention, parents)
    for name, module in attention.items():
        copy_twin_weights(by_parent[name.rpartition(".")[0]], module, name)
    # each block compared is the twin's, or the module around it that holds the unit (RDNet's dense block
    # holds the unit on a dense layer's new features, which the twin's SE ends the layer with)
    owners = {_twin_block(n, parents): n.rpartition(".")[0] for n in units}
    compared = sorted({p if owners[p].startswith(p) else owners[p] for p in parents})
    expected, seen = _block_io(twin, compared, x)
    with torch.no_grad():
        per_block = [scaled_difference(injected.get_submodule(b)(*a), out) for b, (a, out) in seen.items()]
        if torch.allclose(plain(x), expected):
            raise NotReproduced("the twin's attention changes nothing at this input")
        return TwinResult(len(units), max(per_block), scaled_difference(injected(x), expected))
