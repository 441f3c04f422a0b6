"""The one exception family raised for bad weight files.

Every problem with a file a user hands us — wrong extension, truncated bytes, a header that lies about its
tensors, NaN values, names that clash — surfaces as a :class:`WeightsError` (a ``ValueError``), so callers
(nodes, the CLI, training) need exactly one ``except`` clause.
"""
from __future__ import annotations


class WeightsError(ValueError):
    """A weight file is unsafe (a pickle), malformed, or does not fit the model it is meant for."""


class MalformedFileError(WeightsError):
    """The bytes of a ``.safetensors`` file are not a valid, self-consistent safetensors file.

    Kept apart from :class:`WeightsError` because the bank reader (``bank_format.parse_bank_header``) lets it and
    :class:`FormatMismatchError` pass as they are, and prefixes the file's name to any other WeightsError."""


class FormatMismatchError(WeightsError):
    """A valid safetensors file that is not the kind of file asked for, or not for the target model (kept apart
    for the bank reader, as :class:`MalformedFileError`)."""


class NameLookupError(WeightsError, KeyError):
    """A category name is not in a bank (the message carries "did you mean ..." suggestions). Also a KeyError,
    for mapping-style lookups; ``CategoryBank.__contains__`` catches it to tell "ambiguous" from "absent"."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""
