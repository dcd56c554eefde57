"""Every error se_inject raises on purpose derives from :class:`SEInjectError`.

User mistakes are ``ValueError``/``TypeError`` subclasses, so callers can catch either the
package error or the builtin they already expect; the CLI turns any of them into one line and
exit code 2.
"""

from __future__ import annotations


def one_line(err: BaseException, limit: int = 200, *, with_type: bool = True) -> str:
    """``err`` as one line for a message: its text with whitespace collapsed and cut at ``limit``,
    after its type name unless ``with_type`` is False (the type alone when it has no text)."""
    text = " ".join(str(err).split())[:limit]
    if not with_type:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def first_line(err: BaseException, limit: int = 200, *, with_type: bool = False) -> str:
    """The first line of ``err``'s text, cut at ``limit`` (its type name when it has no text): torch
    and fx put the cause first and append context (the graph, "While executing ...") below it."""
    lines = str(err).strip().splitlines()
    text = lines[0].strip()[:limit] if lines else ""
    if not text:
        return type(err).__name__
    return f"{type(err).__name__}: {text}" if with_type else text


class SEInjectError(Exception):
    """Base class of every error se_inject raises on purpose."""


class ConfigError(SEInjectError, ValueError):
    """An injection option is invalid; the message names the option."""


class ModelSpecError(SEInjectError, ValueError):
    """A model specification (timm name, ``torchvision:NAME``, ``module:callable``) cannot be resolved."""


class RuleError(SEInjectError, ValueError):
    """A placement rule file is malformed; the message names the file, the rule and the field."""


class ArtifactError(SEInjectError, ValueError):
    """A saved model directory, recipe or weights file is missing, damaged or would be overwritten."""


class UntrustedCodeError(SEInjectError, ValueError):
    """Loading would import and run Python code named by a saved directory, and the caller did not
    opt in (``trust_code=True``, CLI ``--trust-code``)."""


class InvalidModelError(SEInjectError, TypeError):
    """What was given as a model is not an nn.Module se_inject can work on (or copy)."""


class ResumeMismatchError(SEInjectError, ValueError):
    """A run cannot be resumed with these settings; the message lists every difference."""


class TrainingDivergedError(SEInjectError, RuntimeError):
    """The training loss became NaN or infinite; nothing of that epoch was saved."""


class RecipeMismatchError(SEInjectError, ValueError):
    """A recipe was applied to a model whose sites are not the recipe's (another architecture)."""


class CheckpointError(SEInjectError, ValueError):
    """A checkpoint file cannot be read safely or does not fit the model (each key is named)."""


class AlreadyInjectedError(SEInjectError, ValueError):
    """The model already holds units se_inject inserted."""


class DataError(SEInjectError, ValueError):
    """A dataset is missing, empty, malformed or holds an unreadable image (the path is named)."""


class NoSitesError(SEInjectError, ValueError):
    """The model holds no place where the requested SE position applies."""


class UntraceableModelError(SEInjectError, RuntimeError):
    """torch.fx could not trace the model; the message names the module that broke the trace.

    ``path`` is that module's qualified name ("" for the model's own forward; None: not known).
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ShapePropagationError(SEInjectError, RuntimeError):
    """Running the traced graph on fake/meta tensors failed at a node (printed in the message)."""


class NeedsValuesError(ShapePropagationError):
    """An operation on meta tensors needs tensor values (``.item()``, ``.tolist()``, ``nonzero``),
    which the meta device does not have; raised before the operation runs, with its name."""


class RewriteError(SEInjectError, RuntimeError):
    """The graph rewrite could not be carried out; the user's model is left untouched.

    ``owner`` names the module that cannot hold units (None: not specific to one module).
    """

    def __init__(self, message: str, owner: str | None = None) -> None:
        super().__init__(message)
        self.owner = owner


class NotScriptableError(SEInjectError, RuntimeError):
    """``torch.jit.script`` of a model that holds se_inject units (TorchScript is deprecated: export it)."""
