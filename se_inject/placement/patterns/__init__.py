"""Pattern kinds: the graph structures an SE unit can be attached to, found by structure alone.

Each kind is a function registered with :func:`register_pattern`, which refuses a name twice. It
returns :class:`Candidate` s: where the structure is, the named *anchors* a rule can put a unit on,
and measured *facts* a rule's conditions test. Which kinds are used, under which conditions and
with which anchor per position is decided by the rules in ``rules/*.toml``, not here.

- ``residual_add``: an addition of two feature maps that share a fork. The path from the fork with
  more convolutions (then more nodes) is the branch F_tr; the other is the shortcut.
- ``branch_concat``: a channel concatenation of paths that fork from one input (Inception modules;
  ShuffleNet's split / concatenate; DenseNet's concatenation of new features).
- ``dense_concat``: DenseNet's concatenation of a dense layer's new features to those it read.
- ``depthwise``: a depthwise convolution (groups == in_channels) with the norm and activation after it.
- ``conv_act``: a convolution followed (through its norm) by a non-linearity (plain VGG stacks).
- ``branch_sum``: the sum of parallel conv branches of one input (RepVGG, MobileOne), whole.

Existing channel gates (``x * f(pool(x))``: SE, ECA, ...) are found by :func:`find_channel_gates`.
"""

from se_inject.placement.patterns import (  # noqa: F401 - registers the kinds
    branch_sum,
    concat,
    conv_act,
    dense,
    depthwise,
    residual,
)
from se_inject.placement.patterns.base import (
    PATTERNS,
    Candidate,
    Finder,
    Insertion,
    PatternKind,
    register_pattern,
)

__all__ = ["PATTERNS", "Candidate", "Finder", "Insertion", "PatternKind", "find_candidates", "register_pattern"]
