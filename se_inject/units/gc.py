"""Global Context (GC) block.

Paper: `GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond`, Cao, Xu, Lin, Wei, Hu
(ICCV Workshops 2019), https://arxiv.org/abs/1904.11492. Context modelling pools the feature map
with a softmax attention over positions (a 1x1 conv to one channel), instead of SE's average; a
bottleneck transform ``C -> C/r -> C`` with LayerNorm and ReLU follows, and its result is fused
back by addition (the paper's choice, ``fusion="add"``), by an SE-like gate (``"scale"``) or both.
timm names the scale variant ``gc`` and the additive one ``gca``.

The published init (GCNet's): Kaiming-normal (fan in) for the attention conv, each transform's last
layer zero, so the additive block starts as the identity and the scale block gates at 0.5.
``init="preserve"`` keeps that and makes the gate ``2 * sigmoid``: every fusion starts as the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from se_inject.units.base import register_unit
from se_inject.units.fold import Affine, SqueezeFold
from se_inject.units.parts import (
    ConvMlp,
    GatedUnit,
    bottleneck_params,
    can_write_over,
    gated,
    is_traced,
    runs_functional,
    spatial_mean,
)


@dataclass(frozen=True)
class GlobalContextOptions:
    fusion: Literal["add", "scale", "both"] = field(
        default="add",
        metadata={
            "help": "how the context comes back: add (GCNet; timm's gca), scale (an SE-like gate; timm's gc), both"
        },
    )
    pooling: Literal["attention", "avg"] = field(
        default="attention", metadata={"help": "context pooling: softmax attention over positions (GCNet), or avg"}
    )


def _attention_pool(flat: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``flat`` (B, N, HW) averaged over positions with the softmax of ``logits`` (B, 1, HW): (B, N)."""
    attn = F.softmax(logits, dim=-1)
    return torch.bmm(flat, attn.transpose(1, 2)).flatten(1)


class GlobalContext(SqueezeFold, GatedUnit):
    """GCNet's block: ``x * gate(T_s(context)) + T_a(context)``, with the transforms ``T`` each
    ``fc2(relu(layernorm(fc1(.))))`` (timm's ``GlobalContext`` layout: ``conv_attn``, ``mlp_scale``,
    ``mlp_add``).

    Example::

        >>> gc = GlobalContext(64, r=16)
        >>> gc(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    paper = "GCNet, Cao et al., ICCV Workshops 2019 (arXiv:1904.11492)"
    Options = GlobalContextOptions
    excitation_shows = "the channel gate of the scale fusion"

    def __init__(
        self,
        channels: int,
        r: int = 16,
        act_layer: str | type[nn.Module] = "relu",
        gate_layer: str | type[nn.Module] = "sigmoid",
        *,
        fusion: str = "add",
        pooling: str = "attention",
        bias: bool = True,
        rounding: str = "floor",
        reduced: int | None = None,
        hidden: int | None = None,
        init: str = "preserve",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(channels, r, gate_layer, init, rounding=rounding, reduced=reduced, hidden=hidden)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        width = self.hidden
        self.fusion = fusion
        self.conv_attn = nn.Conv2d(channels, 1, 1, bias=True, **factory) if pooling == "attention" else None
        self.mlp_add = ConvMlp(channels, width, act_layer, bias, norm=True, **factory) if fusion != "scale" else None
        self.mlp_scale = ConvMlp(channels, width, act_layer, bias, norm=True, **factory) if fusion != "add" else None
        # only the scale fusion is a gate that could be frozen to a fixed per-channel scale
        self.channel_gate = fusion == "scale"
        if fusion == "add":
            self.excitation_shows = ""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GCNet's init: Kaiming-normal (fan in) attention conv with a zero bias, each transform's last layer zero."""
        with torch.no_grad():
            if self.conv_attn is not None:
                nn.init.kaiming_normal_(self.conv_attn.weight, mode="fan_in", nonlinearity="relu")
                if self.conv_attn.bias is not None:
                    nn.init.zeros_(self.conv_attn.bias)
            for mlp in (self.mlp_add, self.mlp_scale):
                if mlp is not None:
                    mlp.zero_last()

    def expected_params(self) -> Fraction:
        """Attention conv ``C + 1``; per transform ``2 C h`` (+ ``h + C`` with bias) and LayerNorm's ``2 h``,
        with ``h = C/r`` unrounded (the block input over r with ``reduce_from="block_input"``)."""
        mlp = self.mlp_add or self.mlp_scale
        assert mlp is not None  # every fusion has at least one transform
        h = self.exact_hidden()
        transform = bottleneck_params(self.channels, h, mlp.fc1.bias is not None) + 2 * h
        transforms = (self.mlp_add is not None) + (self.mlp_scale is not None)
        attention = self.channels + 1 if self.conv_attn is not None else 0
        return attention + transforms * transform

    # the squeeze before the block's last conv: the attention logits over positions are an affine map of the
    # conv's input h, u . h_p plus a constant that the softmax drops (u = W^T (a * w)), and the weights sum
    # to 1, so the attention-weighted context is BatchNorm and the conv of h's attention-weighted mean
    fold_attn: torch.Tensor  # u, in the conv's dtype

    def fold_inputs(self) -> tuple[torch.Tensor | None, ...]:
        return () if self.conv_attn is None else (self.conv_attn.weight,)

    def fold_extra(self, affine: Affine, conv: torch.Tensor) -> None:
        if self.conv_attn is not None:
            self.store_fold("fold_attn", self._narrow_attention(affine, conv).to(self.conv_attn.weight.dtype))

    def _narrow_attention(self, affine: Affine, conv: torch.Tensor) -> torch.Tensor:
        assert self.conv_attn is not None
        weight = self.conv_attn.weight.flatten().to(conv.dtype)
        return conv.T @ (affine[0] * weight)

    def pool_narrow(self, source: torch.Tensor, live: tuple[Affine, torch.Tensor] | None) -> torch.Tensor:
        if self.conv_attn is None:
            return super().pool_narrow(source, live)
        u = self.fold_attn if live is None else self._narrow_attention(*live)
        if torch.compiler.is_compiling():
            # as reductions the compiler fuses (3% off a compiled ResNet-50 at batch 16, against two bmm
            # calls); eagerly these would write two product maps, which the bmm form does not
            logits = (source * u.view(1, -1, 1, 1)).sum(1, keepdim=True)
            attn = F.softmax(logits.flatten(2), dim=-1).view_as(logits)
            return (source * attn).sum((2, 3))
        flat = source.flatten(2)
        return _attention_pool(flat, torch.bmm(u.view(1, 1, -1).expand(flat.shape[0], 1, -1), flat))

    def context(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled context, (B, C, 1, 1): attention-weighted over positions, or the mean.

        The attention conv (C -> 1, 1x1) is computed as a batched matrix-vector product over the
        flattened map: the same sums, on CPU about a fifth of a one-channel convolution's time (bmm, not
        matmul: torch.matmul broadcasting a weight that requires grad was twenty times slower here).
        """
        folded = self.folded_pool(source)
        if folded is not None:  # pooled before the block's last conv (optimize_for_inference)
            return folded.view(x.shape[0], self.channels, 1, 1)
        if self.conv_attn is None:
            return spatial_mean(x)
        batch, channels, height, width = x.shape
        flat = x.reshape(batch, channels, height * width)
        if runs_functional(self.conv_attn, nn.Conv2d, x):
            weight = self.conv_attn.weight.view(1, 1, channels).expand(batch, 1, channels)
            logits = torch.bmm(weight, flat)  # (B, 1, HW)
            if self.conv_attn.bias is not None:
                logits = logits + self.conv_attn.bias.view(1, 1, 1)
        else:  # a swapped or hooked layer, or a traced forward: the module's own call
            logits = self.conv_attn(x).reshape(batch, 1, height * width)
        return _attention_pool(flat, logits).view(batch, channels, 1, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp_scale is None:
            raise TypeError("a GC block with fusion='add' has no gate")
        return self.mlp_scale(self.context(x))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The fusions of the context with ``x`` (plus ``residual``); ``source`` as SE's (see ``SqueezeFold``)."""
        context = self.context(x, source)
        if self.mlp_add is None:  # scale alone: SE's product
            assert self.mlp_scale is not None
            return gated(x, self.gate(self.mlp_scale(context)), residual, self.overwrite_input)
        added = self.mlp_add(context)
        if self.mlp_scale is not None:
            y = (x * self.gate(self.mlp_scale(context))).add_(added)
        elif self.overwrite_input and not is_traced(x) and can_write_over(x, added, residual):
            y = x.add_(added)  # inference on memory nothing else reads
        else:
            y = x + added
        return y if residual is None else y.add_(residual)  # y is the unit's own memory: no allocation

    def extra_repr(self) -> str:
        return f"channels={self.channels}, r={self.r}, hidden={self.hidden}, fusion={self.fusion}"


register_unit("gc", GlobalContext)
