"""The squeeze taken before the block's last 1x1 conv: what every unit with a pooled linear squeeze shares.

A unit's input ``x`` is often ``BN(W h + c)``: BatchNorm (eval) of a stride-1 1x1 convolution, the
last conv of every bottleneck and inverted residual. BatchNorm's affine map ``a, b`` (running
statistics) and the conv are linear per position, so any pooling whose weights over positions sum to 1
commutes with them: ``pool(x) = a * (W pool(h) + c) + b``. A unit whose first step after the pooling
is a linear map ``L`` (SE's ``fc1``, eSE's ``fc``, ECA's 1-D conv across channels, Gather-Excite's
first MLP layer, the identity for GC's context) can then pool ``h``, which is 4x (bottleneck) to 6x
(inverted residual) narrower than ``x``, and apply one matrix ``L diag(a) W``. The values are the
usual ones up to float rounding (sums taken in another order); ``tests/surgery/test_optimize.py``
checks that in float64 for every unit that folds.

:class:`SqueezeFold` holds the folded matrix, refolds it when a weight it was made of changes, and
computes from the live weights, layer by layer, where a gradient is wanted. A unit provides its
linear map (:meth:`SqueezeFold.pooled_map`), says why it cannot fold (:meth:`SqueezeFold.fold_refusal`),
and may pool otherwise than by the mean (GC's attention: :meth:`SqueezeFold.pool_narrow`).
See ``se_inject.optimize_for_inference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from se_inject.errors import ConfigError
from se_inject.units.parts import GatedUnit, gated

Affine = tuple[torch.Tensor, torch.Tensor]  # BatchNorm's (a, b): x = a * y + b per channel


def batchnorm_affine(norm: nn.BatchNorm2d, dtype: torch.dtype | None = None) -> Affine:
    """BatchNorm's per-channel affine map from its running statistics, in ``dtype`` (the live tensors,
    differentiable, when None)."""
    assert norm.running_mean is not None and norm.running_var is not None  # checked by optimize_for_inference

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t if dtype is None else t.to(dtype)

    a = torch.rsqrt(cast(norm.running_var) + norm.eps)
    if norm.weight is not None:
        a = a * cast(norm.weight)
    b = -cast(norm.running_mean) * a
    if norm.bias is not None:
        b = b + cast(norm.bias)
    return a, b


class FoldsChecked:
    """Whether every fold of an optimised model was checked at the start of the model's call now running.

    Shared by the model's folded units: the model's pre-hook sets it once it has refolded what changed, and
    a forward hook that runs when the call returns or raises clears it, so inside that call no unit checks
    its own fold a second time (the check reads eight tensors' identities and versions, about 11 us a unit on
    a 2-core CPU, what the unit's two small matmuls take at batch 1). A unit called outside such a
    call (a block alone) checks itself.
    """

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = False


class SqueezeFold(nn.Module):
    """Mixin of a unit whose squeeze is a pooled linear map, so that it can squeeze before its block's
    last 1x1 conv and BatchNorm (:meth:`squeeze_through`); see the module docstring.

    The unit calls :meth:`folded_pool` with the conv's input (``source``, passed by the rewritten
    graph) and gets ``L(pool(x))``, or None where it must compute from ``x`` as usual (training mode,
    no fold).
    """

    # buffers of squeeze_through: L, the block's conv and BatchNorm folded into one matrix and bias
    fold_weight: torch.Tensor
    fold_bias: torch.Tensor

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        # the block's (conv, norm) folded into the squeeze: not children, not saved
        # norm: a BatchNorm2d, or torchvision's FrozenBatchNorm2d, which has its tensors and eps
        self._through: tuple[nn.Conv2d, nn.BatchNorm2d] | None = None
        self._folded_from: tuple | None = None  # _fold_key() when the fold buffers were computed
        self.folds_checked: FoldsChecked | None = None  # shared with the model's other folded units

    # what a unit provides
    def fold_refusal(self) -> str | None:
        """Why this unit cannot squeeze before a conv (its pooling does not commute with one), or None."""
        return None

    def pooled_map(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The linear map the unit applies to its pooled input, as a live ``(D, C)`` weight (None: the
        identity) and a ``(D,)`` bias (or None), in the weights' own dtype and differentiable."""
        return None, None

    def fold_inputs(self) -> tuple[torch.Tensor | None, ...]:
        """The unit's own tensors the fold reads (those of :meth:`pooled_map` and of its pooling)."""
        return self.pooled_map()

    def pool_narrow(self, source: torch.Tensor, live: tuple[Affine, torch.Tensor] | None) -> torch.Tensor:
        """The unit's pooling of ``x`` taken on ``source``, (B, narrow): the mean over positions. ``live`` is
        BatchNorm's affine map and the conv's ``(C, narrow)`` matrix, differentiable, for a pooling that
        reads them; None on the folded path (where it reads what :meth:`fold_extra` kept)."""
        return source.mean((2, 3))

    def fold_extra(self, affine: Affine, conv: torch.Tensor) -> None:
        """Fold what the unit's own pooling reads (from float64 ``affine`` and ``conv``) into buffers of its own."""

    # the machinery
    def squeeze_through(self, conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
        """Squeeze before ``conv`` (1x1, stride 1, one group) and ``norm`` (BatchNorm in eval mode),
        which produce the unit's input: called with ``source=`` (the conv's input), the unit in eval
        mode pools ``source`` and applies one matrix that folds ``conv``, ``norm``'s affine map and its
        own first linear map together, with the same result up to float rounding.

        ``conv`` and ``norm`` stay the block's modules (not children of the unit). The folded matrix
        follows their weights and the unit's: whatever changes one of them in place or replaces it
        (``load_state_dict``, an optimiser step, ``.to()``) is seen at the next call, which folds again
        (under ``torch.compile`` the model's pre-hook does this check, outside the graph). Where a
        gradient is wanted (grad mode on and one of those weights trainable) the unit computes from the
        live weights layer by layer, so every weight gets its gradient.
        """
        refusal = self.fold_refusal()
        if refusal is not None:
            raise ConfigError(f"optimize_for_inference: {type(self).__name__} cannot squeeze before a conv: {refusal}")
        self._through = (conv, norm)
        self._folded_from = None
        self._fold()

    @property
    def squeezes_through(self) -> bool:
        """Whether :meth:`squeeze_through` folded a conv and BatchNorm into the squeeze."""
        return self._through is not None

    def _folded_tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The unit's tensors the fold reads, then the conv's and the norm's (running statistics last)."""
        assert self._through is not None
        conv, norm = self._through
        own = self.fold_inputs()
        return (*own, conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)

    def _fold_key(self) -> tuple | None:
        """What the folded matrix was computed from: each tensor's identity and version counter (every in-place
        change bumps it; ``load_state_dict(assign=True)`` or a new Parameter changes the identity), and the
        dtype and device; None where a tensor keeps no version (made in inference mode). Not data pointers:
        torch.compile cannot trace a comparison of one. Cheap: it runs before every call."""
        tensors = self._folded_tensors()
        try:
            key = tuple(None if t is None else (id(t), t._version, t.dtype) for t in tensors)
        except RuntimeError:  # inference tensors track no version: fold at every call
            return None
        assert self._through is not None
        weight = self._through[0].weight
        return (*key, weight.device, self._through[1].eps)

    def _folds_now(self) -> bool:
        """Whether the folded path may run: it computes no gradient for the weights folded into it."""
        if not torch.is_grad_enabled():
            return True
        return not any(t is not None and t.requires_grad for t in self._folded_tensors()[:-2])

    def _fold(self) -> None:
        """``fold_weight``/``fold_bias``: ``L(a * (W m + c) + b) = fold_weight m + fold_bias`` for the pooled
        conv input ``m`` (in float64, stored in the conv's dtype)."""
        assert self._through is not None
        conv, norm = self._through
        wide = torch.float64
        with torch.no_grad():
            a, b = batchnorm_affine(norm, wide)
            if conv.bias is not None:
                b = b + a * conv.bias.to(wide)
            matrix = conv.weight.to(wide).flatten(1)
            self.fold_extra((a, b), matrix)
            weight, bias = a[:, None] * matrix, b
            own_weight, own_bias = self.pooled_map()
            if own_weight is not None:
                weight, bias = own_weight.to(wide) @ weight, own_weight.to(wide) @ bias
            if own_bias is not None:
                bias = bias + own_bias.to(wide)
        dtype = conv.weight.dtype
        self.store_fold("fold_weight", weight.to(dtype))
        self.store_fold("fold_bias", bias.to(dtype))
        self._folded_from = self._fold_key()

    def store_fold(self, name: str, value: torch.Tensor) -> None:
        """Keep ``value`` as the non-persistent buffer ``name``, in place where it fits (a compiled graph keeps
        reading the same buffer)."""
        current = getattr(self, name, None)
        if isinstance(current, torch.Tensor) and (current.shape, current.dtype, current.device) == (
            value.shape,
            value.dtype,
            value.device,
        ):
            with torch.no_grad():
                current.copy_(value)
        else:
            self.register_buffer(name, value, persistent=False)

    def _live(self, source: torch.Tensor) -> torch.Tensor:
        """``L(pool(x))`` from ``source`` through the live weights, one layer after the other (the conv's
        matrix, BatchNorm's affine map, the unit's map): where a gradient is wanted, so each gets its own."""
        assert self._through is not None
        conv, norm = self._through
        a, b = batchnorm_affine(norm)
        matrix = conv.weight.flatten(1)
        pooled = F.linear(self.pool_narrow(source, ((a, b), matrix)), matrix, conv.bias)
        pooled = torch.addcmul(b, pooled, a)
        weight, bias = self.pooled_map()
        if weight is None:
            return pooled if bias is None else pooled + bias
        return F.linear(pooled, weight, bias)

    def refresh_fold(self) -> None:
        """Fold again if a weight folded into the squeeze changed since the last fold (eagerly: the check
        reads version counters, which a compiler cannot trace)."""
        key = self._fold_key()
        if key is None or key != self._folded_from:
            self._fold()

    def folded_pool(self, source: torch.Tensor | None) -> torch.Tensor | None:
        """``L(pool(x))`` (B, D) computed from ``source``, the conv's input, in eval mode once folded; None
        otherwise (the unit then pools its own input)."""
        if source is None or self.training or self._through is None:
            return None
        if not self._folds_now():  # a gradient is wanted: through every weight folded into the squeeze
            return self._live(source)
        # compiled, or called inside the optimised model's call: its pre-hook has just checked the fold
        if not torch.compiler.is_compiling() and not (self.folds_checked is not None and self.folds_checked.now):
            self.refresh_fold()
        return F.linear(self.pool_narrow(source, None), self.fold_weight, self.fold_bias)


class FoldingGatedUnit(SqueezeFold, GatedUnit):
    """A gated unit that can fold (eSE, ECA, CECA, Gather-Excite): ``x * gate(logits(x))``, where ``logits``
    takes the conv's input as ``source`` and starts from :meth:`~SqueezeFold.folded_pool` when it is given.
    SE and GC, which compute more than a gate from the pooled values, write their own forward."""

    def logits(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement logits")

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x * gate(logits(x))`` (plus ``residual``, in one pass); ``source`` is the input of the conv that
        produced ``x``, passed by ``se_inject.optimize_for_inference``'s rewrite."""
        return gated(x, self.gate(self.logits(x, source)), residual, self.overwrite_input)
