"""The one exception family raised for bad weight files.

Every problem with a file a user hands us — wrong extension, truncated bytes, a header that lies about its
tensors, NaN values, names that clash — surfaces as a :class:`WeightsError` (a ``ValueError``), so callers
(nodes, the CLI, training) need exactly one ``except`` clause.
"""
from __future__ import annotations


class WeightsError(ValueError):
    """A weight file is unsafe, malformed, or does not fit the model it is meant for."""


class UnsafeFormatError(WeightsError):
    """The file is in a pickle-based format (``.pt``, ``.bin``, ``.ckpt``, ...) that we refuse to open."""


class MalformedFileError(WeightsError):
    """The bytes of a ``.safetensors`` file are not a valid, self-consistent safetensors file."""


class FormatMismatchError(WeightsError):
    """A valid safetensors file that is not the kind of file asked for, or not for the target model."""


class NameLookupError(WeightsError, KeyError):
    """A category name is not in a bank (the message carries "did you mean ..." suggestions)."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""
