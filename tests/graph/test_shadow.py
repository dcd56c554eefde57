"""Abstract execution: meta tensors refuse, with one typed error, the operations that read values."""

import pytest
import torch

from se_inject.errors import NeedsValuesError, ShapePropagationError
from se_inject.graph.shadow import RefuseMetaValues, ShapeOnlyBatchNorm


@pytest.mark.parametrize(
    "read, op",
    [
        (lambda t: t.sum().item(), "_local_scalar_dense"),
        (lambda t: bool(t.sum() > 0), "_local_scalar_dense"),
        (lambda t: t.tolist(), "_to_copy"),
        (lambda t: t.cpu(), "_to_copy"),
        (lambda t: t.nonzero(), "nonzero"),
        (lambda t: torch.equal(t, t), "equal"),
    ],
)
@pytest.mark.parametrize("mode", [RefuseMetaValues, ShapeOnlyBatchNorm])
def test_reading_values_of_meta_tensors_is_refused_by_name(read, op, mode):
    t = torch.ones(3, 4, device="meta")
    with mode(), pytest.raises(NeedsValuesError, match=rf"aten::{op}\b.* needs tensor values") as info:
        read(t)
    assert isinstance(info.value, ShapePropagationError)


def test_shape_errors_and_real_tensors_pass_through():
    with RefuseMetaValues():
        assert torch.ones(3).sum().item() == 3.0  # real tensors keep their values
        assert torch.ones(2, 3, device="meta").to("meta").is_meta  # meta to meta copies nothing
        with pytest.raises(RuntimeError) as info:  # a wrong shape is not a missing value
            torch.ones(2, 3, device="meta") @ torch.ones(2, 3, device="meta")
        assert not isinstance(info.value, NeedsValuesError)
