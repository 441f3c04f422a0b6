"""Errors of the pipeline layer: one family, messages that say what to fix (the CLI prints them as one line)."""
from __future__ import annotations


class PipelineError(ValueError):
    """A problem with the inputs or models of a generation run; the message says what to fix."""
