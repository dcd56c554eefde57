"""The parts the units share: bottleneck widths, gates, activations, and the gated product.

A unit's gate is built by :func:`create_gate`: the published gate, or, for the ``preserve`` start,
its variant that equals 1 at 0 (so a unit whose last layer is zero multiplies every channel by
exactly 1.0). :func:`gated` writes ``x * s`` (or ``residual + x * s``) as the SE unit does, in place
when the rewrite found that nothing else reads ``x``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from se_inject.config import ACTS, GATES, INITS, ROUNDINGS
from se_inject.errors import ConfigError
from se_inject.units.base import ChannelUnit

if TYPE_CHECKING:
    from se_inject.config import InjectConfig


def _nearest_multiple(exact: Fraction, divisor: int = 8) -> int:
    """timm's ``make_divisible(v, divisor)`` core: the nearest multiple of ``divisor`` (halves up), at
    least ``divisor``."""
    return max(divisor, math.floor(exact + Fraction(divisor, 2)) // divisor * divisor)


def hidden_width(channels: int, r: int, rounding: str = "floor") -> int:
    """Width of the excitation bottleneck for ``channels`` at reduction ``r`` (``channels`` is what r
    divides: the unit's own channels, or the block's input for ``reduce_from="block_input"``).

    - ``floor`` (default): exactly ``C/r`` whenever ``r`` divides ``C``, which is what Eq. 5 assumes;
    - ``ceil``; ``round``: halves up;
    - ``round_even``: Python's ``round`` (halves to even), as EfficientNet's and RegNetY's SE;
    - ``divisible8``: timm's ``make_divisible(C/r, 8)``: the nearest multiple of 8, at least 8,
      raised by 8 where that falls more than 10% below ``C/r`` (MobileNetV3's ``round_channels``);
    - ``divisible4``: the same with 4, ``make_divisible(C/r, 4)`` (GhostNet's SE);
    - ``timm_se``: timm's SEModule, ``make_divisible(C/r, 8, round_limit=0)``: the nearest
      multiple of 8, at least 8, without the 10% correction;
    - ``floor_min64``: ``max(C // r, 64)`` (TResNet's SE).

    The result is never below 1.

    >>> hidden_width(64, 16), hidden_width(64, 16, "timm_se"), hidden_width(10, 16)
    (4, 8, 1)
    >>> hidden_width(144, 16, "timm_se"), hidden_width(144, 16, "divisible8")
    (8, 16)
    >>> hidden_width(72, 4, "divisible4"), hidden_width(256, 4, "floor_min64"), hidden_width(128, 4, "floor_min64")
    (20, 64, 64)
    """
    if rounding not in ROUNDINGS:
        raise ConfigError(f"rounding: {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    exact = Fraction(channels, r)
    if rounding == "floor":
        width = channels // r
    elif rounding == "ceil":
        width = -(-channels // r)
    elif rounding == "round":
        width = math.floor(exact + Fraction(1, 2))
    elif rounding == "round_even":
        width = round(exact)
    elif rounding == "timm_se":
        width = _nearest_multiple(exact)
    elif rounding == "floor_min64":
        width = max(channels // r, 64)
    else:  # divisible8, divisible4
        divisor = 4 if rounding == "divisible4" else 8
        width = _nearest_multiple(exact, divisor)
        if width < Fraction(9, 10) * exact:
            width += divisor
    return max(1, width)


class ScaledSigmoid(nn.Module):
    """``2 * sigmoid(x)``: a sigmoid gate that equals 1 at 0 (range 0..2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(x)


class ScaledHardSigmoid(nn.Module):
    """``2 * hard_sigmoid(x)``: MobileNetV3's gate made to equal 1 at 0 (range 0..2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * F.hardsigmoid(x)


class ShiftedTanh(nn.Module):
    """``1 + tanh(x)``: a tanh gate that equals 1 at 0 (range 0..2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 + torch.tanh(x)


class ShiftedReLU(nn.Module):
    """``relu(1 + x)``: a ReLU gate that equals 1 at 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(1.0 + x)


# name -> (gate as published, gate with gate(0) == 1 for the preserve initialisation)
_GATES: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module]]] = {
    "sigmoid": (nn.Sigmoid, ScaledSigmoid),
    "hard_sigmoid": (nn.Hardsigmoid, ScaledHardSigmoid),
    "tanh": (nn.Tanh, ShiftedTanh),
    "relu": (nn.ReLU, ShiftedReLU),
}
assert set(_GATES) == set(GATES)

# name -> activation between the two FC layers (torch's own modules, as timm's create_act_layer gives them)
_ACTS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "hard_swish": nn.Hardswish,
    "leaky_relu": nn.LeakyReLU,
}
assert set(_ACTS) == set(ACTS) - {"block"}  # "block": the planner gives each unit its block's activation


def create_gate(gate: str | type[nn.Module], preserve: bool) -> nn.Module:
    """Build the excitation gate from a name (``sigmoid``, ``hard_sigmoid``, ``tanh``, ``relu``) or a class.

    With ``preserve`` a named gate is its variant that equals 1 at 0; a class must already do so.
    """
    if isinstance(gate, str):
        if gate not in _GATES:
            raise ConfigError(f"gate: {gate!r} is not one of {', '.join(GATES)}")
        return _GATES[gate][1 if preserve else 0]()
    if isinstance(gate, type) and issubclass(gate, nn.Module):
        module = gate()
        if preserve and float(module(torch.zeros(1))) != 1.0:
            raise ConfigError(f"gate: {gate.__name__}(0) must equal 1 for init='preserve'")
        return module
    raise ConfigError(f"gate: expected a name or an nn.Module class, got {gate!r}")


def zero_(layer: nn.Module) -> None:
    """Zero ``layer``'s weight and bias (where it has them), in place: the zero start of a unit's last layer."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                nn.init.zeros_(tensor)


def zeroes_last(init: str) -> bool:
    """Whether ``init`` starts the unit's last learned layer at zero: ``preserve`` (under the gate variant
    equal to 1 at 0: the identity) and ``zero`` (under the published gate: a sigmoid gate of exactly 0.5,
    which halves every channel). ``paper`` is each paper's own init."""
    return init in ("preserve", "zero")


def create_act(act: str | type[nn.Module]) -> nn.Module:
    """The activation between the FC layers, from a name (``relu``, ``silu``, ...) or a module class."""
    if isinstance(act, str):
        if act not in _ACTS:
            wanted = ", ".join(_ACTS)
            raise ConfigError(f"act: {act!r} names no activation of its own here; use one of {wanted} or a class")
        return _ACTS[act]()
    if isinstance(act, type) and issubclass(act, nn.Module):
        return act()
    raise ConfigError(f"act: expected a name or an nn.Module class, got {act!r}")


def can_write_over(x: torch.Tensor, s: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether the result may go into ``x``'s memory: autograd records nothing (no operand needs a
    gradient: in an SE-only training phase ``x`` has none but the gate has), the result has ``x``'s
    dtype (under autocast the residual or the gate can be wider), and ``x``'s layout (``residual + x``
    takes the residual's strides: written into a channels-last ``x`` beside a contiguous residual,
    the same values would reach the next layers in another layout, whose kernels round otherwise,
    as CoAtNet's attention blocks showed), and no torch.func transform (vmap) is running."""
    operands = (s,) if residual is None else (s, residual)
    if torch._C._are_functorch_transforms_active():  # vmap, grad: their batching rules have no out= kernels
        return False
    if residual is not None and residual.stride() != x.stride():
        return False
    return not any(t.requires_grad for t in operands) and all(
        t.dtype == x.dtype or torch.promote_types(x.dtype, t.dtype) == x.dtype for t in operands
    )


# the width of a gate's range: how far a constant gate is from one that spans it (inspect's saturation)
_GATE_RANGES: dict[type[nn.Module], float] = {
    nn.Sigmoid: 1.0,
    nn.Hardsigmoid: 1.0,
    nn.Tanh: 2.0,
    ScaledSigmoid: 2.0,
    ScaledHardSigmoid: 2.0,
    ShiftedTanh: 2.0,
}


def gate_range(gate: nn.Module) -> float:
    """The width of ``gate``'s range (2 for the preserve start's ``2 * sigmoid``); 1 for an unbounded
    or unknown gate, whose saturation is then read against a sigmoid's range."""
    return _GATE_RANGES.get(type(gate), 1.0)


def is_traced(x: torch.Tensor) -> bool:
    """Whether ``x`` is a torch.fx proxy: the forward is being traced (``symbolic_trace``, ``prepare_fx``,
    ``create_feature_extractor``), so it records plain out-of-place operations and module calls and asks
    nothing of the tensor's properties, which a proxy does not have."""
    return isinstance(x, fx.Proxy)


def runs_functional(module: nn.Module, cls: type[nn.Module], x: torch.Tensor) -> bool:
    """Whether a unit may compute ``module`` (a layer of its own, of type ``cls``) with a functional call on
    its weights, which skips the per-call cost of a module call (visible at batch 1): only where the module
    is exactly ``cls`` with no hooks and the forward is not traced. A tool that swaps the layer (dynamic
    quantization), hooks it (pruning, feature extraction) or traces the unit sees an ordinary module call."""
    return (
        type(module) is cls
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not _global_module_hooks()
        and not is_traced(x)
    )


def _global_module_hooks() -> bool:
    hooks = torch.nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


def spatial_mean(x: torch.Tensor, keepdim: bool = True) -> torch.Tensor:
    """The mean of ``x`` over positions (the squeeze). Where autograd records it, as the sum times ``1/(H W)``:
    the same value up to rounding, whose backward hands the gradient on as a broadcast view of the small
    pooled gradient instead of writing a full map (``mean``'s backward divides an expanded copy)."""
    if _sums_for_backward(x):
        return x.sum((2, 3), keepdim=keepdim) * (1.0 / (x.shape[2] * x.shape[3]))
    return x.mean((2, 3), keepdim=keepdim)


def _sums_for_backward(x: torch.Tensor) -> bool:
    """Whether :func:`spatial_mean` takes the sum: autograd records it, outside autocast."""
    return (
        not is_traced(x)  # first: a proxy has no requires_grad to decide on
        and torch.is_grad_enabled()
        and x.requires_grad
        # autocast runs sum (not mean) in float32: it would write a float32 copy of a bf16/fp16 map
        and not torch.is_autocast_enabled(x.device.type)
    )


class ChannelScaleAdd(torch.autograd.Function):
    """``residual + x * s`` (or ``x * s``) for a per-channel gate ``s`` (B, C, 1, 1), with a backward of two
    passes over the map where autograd's ``addcmul`` takes five: ``x``'s gradient ``g * s`` and the gate's
    ``sum(g * x)`` over positions (:func:`channel_dots`: no product map is written); the residual's is ``g``
    itself. The gradients are autograd's up to rounding (``tests/units/test_training_path.py``
    compares them in float64); the backward is built of differentiable operations, so a second
    derivative is right too."""

    @staticmethod
    def forward(x: torch.Tensor, s: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return x * s if residual is None else torch.addcmul(residual, x, s)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, s, _ = inputs
        ctx.save_for_backward(x, s)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, s = ctx.saved_tensors
        needs_x, needs_s, needs_residual = ctx.needs_input_grad
        grad_x = grad * s if needs_x else None
        grad_s = channel_dots(grad, x).view(s.shape) if needs_s else None
        return grad_x, grad_s, grad if needs_residual else None


# the bytes of ``grad * x`` that channel_dots writes at a time on the CPU: a chunk that stays in the caches
# (2 MiB of L2 per core on the machine that measured it; 1 and 16 MiB were slower on ResNet-50's maps)
DOT_CHUNK_BYTES = 4 << 20


def channel_dots(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(grad * x).sum((2, 3))``, shape (B, C), without writing a product map as large as the feature map.

    On the CPU, where no graph is recorded (a first derivative), the product is taken a chunk of
    (sample, channel) rows at a time into one buffer of at most :data:`DOT_CHUNK_BYTES` and summed while
    it is in the cache (a map no larger than one chunk is one product and its sum): the whole product
    map would be a fresh allocation as large as the feature map (page faults, then a second pass), and
    the batched matrix product of one-row matrices that ``einsum`` makes of it is slow on the CPU. Each
    row is summed whole, so the sums are the product map's, bit for bit, whatever the chunk. Elsewhere
    (CUDA, or a graph for a second derivative) that batched product; for channels-last maps, where a
    channel's positions are not adjacent, the product and its sum."""
    if not (grad.is_contiguous() and x.is_contiguous()):
        return (grad * x).sum((2, 3))
    if grad.device.type == "cpu" and grad.dtype == x.dtype and not torch.is_grad_enabled():
        if grad.numel() * grad.element_size() <= DOT_CHUNK_BYTES:
            return (grad * x).sum((2, 3))  # one chunk: no loop
        return _chunked_dots(grad, x)
    return torch.einsum("bchw,bchw->bc", grad, x)


def _chunked_dots(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = grad.shape
    rows, positions = batch * channels, height * width
    grad_rows, x_rows = grad.view(rows, positions), x.view(rows, positions)
    step = max(1, DOT_CHUNK_BYTES // max(1, positions * grad.element_size()))  # max: no zero division on an empty map
    product = grad.new_empty(min(step, rows), positions)
    dots = grad.new_empty(rows)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        torch.mul(grad_rows[start:stop], x_rows[start:stop], out=product[: stop - start])
        torch.sum(product[: stop - start], 1, out=dots[start:stop])
    return dots.view(batch, channels)


def _records_product(x: torch.Tensor, s: torch.Tensor) -> bool:
    """Whether :class:`ChannelScaleAdd` computes the product: autograd records it (training), the gate is per
    channel, and nothing that needs autograd's own operations runs (a tracer, a compiler, which fuses these
    itself, or a torch.func transform)."""
    return (
        not is_traced(x)  # first: a proxy's properties are proxies, which cannot decide anything
        and not is_traced(s)
        and torch.is_grad_enabled()
        and (x.requires_grad or s.requires_grad)
        and x.dim() == 4
        and s.dim() == 4
        and s.shape[2:] == (1, 1)
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


def gated(
    x: torch.Tensor, s: torch.Tensor, residual: torch.Tensor | None, overwrite: bool, scale: float = 1.0
) -> torch.Tensor:
    """``x * s * scale``, or ``residual + x * s * scale`` in one pass (addcmul); written over ``x``
    when ``overwrite`` (the rewrite found nothing else reads it) and :func:`can_write_over` allows
    (never while the forward is traced: a tracer records the out-of-place product). In training the
    product is :class:`ChannelScaleAdd`, whose backward is cheaper than autograd's."""
    if _records_product(x, s):
        return ChannelScaleAdd.apply(x, s * scale if scale != 1.0 else s, residual)
    if overwrite and not is_traced(x) and can_write_over(x, s, residual):
        if residual is None:
            return x.mul_(s * scale if scale != 1.0 else s)
        return torch.addcmul(residual, x, s, value=scale, out=x)
    if residual is None:
        return x * (s * scale if scale != 1.0 else s)
    return torch.addcmul(residual, x, s, value=scale)


def bottleneck_params(channels: int, hidden: Fraction | int, bias: bool) -> Fraction:
    """Weights of a two-layer bottleneck ``C -> h -> C`` (two FC or 1x1 conv layers): ``2 C h``,
    plus ``h + C`` with biases: the term SE's Eq. 5 sums, and the core of its descendants' cost."""
    weights = 2 * channels * Fraction(hidden)
    return weights + Fraction(hidden) + channels if bias else weights


def reduced_width(channels: int, r: int, reduced: int | None, absolute: int | None) -> Fraction:
    """The bottleneck width a closed form predicts: ``reduced / r`` (``C / r`` unless the block's input
    is what r divides), unrounded, as Eq. 5 has it; or the absolute width asked for."""
    return Fraction(absolute) if absolute is not None else Fraction(channels if reduced is None else reduced, r)


def bottleneck_width(channels: int, r: int, config: InjectConfig, reduced: int | None = None) -> int:
    """The hidden width of a unit's bottleneck: ``config.hidden``, else ``reduced or channels`` over
    ``r``, rounded as ``config.rounding`` says (see :func:`hidden_width`)."""
    return config.hidden if config.hidden is not None else hidden_width(reduced or channels, r, config.rounding)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm's ``LayerNorm2d``: eps 1e-6), as GCNet normalises
    its context transform."""

    def __init__(self, channels: int, eps: float = 1e-6, **factory: Any) -> None:
        super().__init__(channels, eps=eps, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
    """``fc2(act(norm(fc1(x))))`` with 1x1 convolutions ``C -> hidden -> C`` (timm's ``ConvMlp`` layout:
    the state_dict keys ``fc1``, ``norm``, ``fc2`` match it)."""

    def __init__(
        self,
        channels: int,
        hidden: int,
        act: str | type[nn.Module],
        bias: bool,
        norm: bool = False,
        **factory: Any,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias, **factory)
        self.norm = LayerNorm2d(hidden, **factory) if norm else nn.Identity()
        self.act = create_act(act)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.norm(self.fc1(x))))

    def zero_last(self) -> None:
        """Zero the last layer: the transform then outputs exactly 0 (a gate(0) == 1 start)."""
        zero_(self.fc2)


# the shared options a unit with a bottleneck reads, and one without (its r shapes nothing)
BOTTLENECK_READS = frozenset({"gate", "act", "bias", "rounding", "reduce_from", "hidden", "init"})
GATE_READS = frozenset({"gate", "bias", "init"})
# each shared option's constructor argument (reduce_from arrives as the width r divides, ``reduced``)
_ARGUMENTS = {"gate": "gate_layer", "act": "act_layer", "bias": "bias", "rounding": "rounding", "hidden": "hidden"}
_ARGUMENTS |= {"init": "init", "squeeze": "squeeze"}


class GatedUnit(ChannelUnit):
    """A unit that multiplies its input by a gate it computes from it: ``x * gate(logits(x))``.

    Subclasses compute :meth:`logits`; the product (fused with a residual addition, written in place
    when allowed) is the SE unit's. ``init="preserve"`` gives the gate its variant equal to 1 at 0.
    A unit with a bottleneck (``uses_r``) gets its width here, from ``hidden`` or ``reduced or C``
    over ``r`` rounded as ``rounding`` says; :meth:`from_config` passes the shared options and the
    unit's own ``Options`` fields to the constructor by name: those of the shared options it ``reads``
    (all but ``squeeze`` for a unit with a bottleneck; ``gate``, ``bias`` and ``init`` for one without).
    """

    channel_gate = True
    excitation_shows = "the channel gate"
    reads = BOTTLENECK_READS
    needs_size: ClassVar[bool] = False  # whether the constructor takes the feature map's size

    def __init__(
        self,
        channels: int,
        r: int,
        gate_layer: str | type[nn.Module],
        init: str,
        *,
        rounding: str = "floor",
        reduced: int | None = None,
        hidden: int | None = None,
        bottleneck: bool = True,
    ) -> None:
        if init not in INITS:
            raise ConfigError(f"init: {init!r} is not one of {', '.join(INITS)}")
        width = 0
        if bottleneck:
            width = hidden if hidden is not None else hidden_width(reduced or channels, r, rounding)
        super().__init__(channels, r, width)
        self.init = init
        self.reduced = reduced  # what r divides, when not channels
        self.absolute_hidden = hidden is not None
        self.gate = create_gate(gate_layer, preserve=init == "preserve")

    @classmethod
    def from_config(
        cls,
        channels: int,
        r: int,
        config: InjectConfig,
        *,
        reduced: int | None = None,
        size: tuple[int, int] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ChannelUnit:
        shared: dict[str, Any] = {"device": device, "dtype": dtype}
        shared |= {argument: getattr(config, name) for name, argument in _ARGUMENTS.items() if name in cls.reads}
        if "reduce_from" in cls.reads:
            shared["reduced"] = reduced
        if cls.needs_size:
            shared["size"] = size
        options = dataclasses.asdict(cls.parse_options(config.unit_options))  # named as the constructor's arguments
        return cls(channels, r, **shared, **options)

    @classmethod
    def hidden_width(cls, channels: int, r: int, config: InjectConfig, *, reduced: int | None = None) -> int:
        return bottleneck_width(channels, r, config, reduced) if cls.uses_r else 0

    def exact_hidden(self) -> Fraction:
        """The bottleneck width a closed form counts: ``reduced / r`` unrounded, or the absolute width."""
        return reduced_width(self.channels, self.r, self.reduced, self.hidden if self.absolute_hidden else None)

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError(f"{type(self).__name__} must implement logits")

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The gate the unit multiplies ``x`` by, shaped to broadcast against it."""
        return self.gate(self.logits(x))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return gated(x, self.excitation(x), residual, self.overwrite_input)

    @property
    def starts_as_identity(self) -> bool:
        return self.init == "preserve"

    @property
    def gate_range(self) -> float:
        return gate_range(self.gate)


@dataclass(frozen=True)
class SEOptions:
    """The SE unit's own options (``unit_options``): what published variants add to the paper's unit."""

    norm: bool = field(
        default=False,
        metadata={
            "help": "a BatchNorm on the bottleneck, between the first layer and the activation (ReXNet's SE); "
            "trained as a norm and counted as its 2 h weights"
        },
    )
