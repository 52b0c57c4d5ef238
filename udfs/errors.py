"""Errors raised at sparkscore's boundaries.

Every user mistake (bad config, missing file, missing column, too many bad rows)
raises a subclass of :class:`SparkscoreError`, itself a ``ValueError``, with one
sentence that names the problem and how to fix it. Entry points print that
sentence and exit non-zero instead of showing a traceback.
"""

from __future__ import annotations

import re


class SparkscoreError(ValueError):
    """Base class for every error a user can fix by changing their call."""


class ConfigError(SparkscoreError):
    """A config file or option is missing, malformed or has an unknown key."""


class ModelLoadError(SparkscoreError):
    """A model file is missing, unreadable, or not a TorchScript / torch.export program."""


class InputPathError(SparkscoreError):
    """An input path does not exist or cannot be read."""


class MissingColumnsError(SparkscoreError):
    """The data lacks columns the model spec names."""

    def __init__(self, missing: list[str], existing: list[str]) -> None:
        self.missing = missing
        self.existing = existing
        super().__init__(f"input columns {missing} are not in the data; the data has columns {existing}")


class ColumnTypeError(SparkscoreError):
    """A feature column has a type the scoring core cannot read."""


class ErrorRateExceeded(SparkscoreError):
    """More rows than --max-error-rate allows failed validation."""


class OutputExistsError(SparkscoreError):
    """The output path exists and the write mode forbids overwriting it."""


class DeviceError(SparkscoreError):
    """The configured device is not available where the model runs (no CUDA, bad GPU address)."""


# Library boilerplate that follows the sentence that matters (torch's "(Could this error message be improved?").
_BOILERPLATE = ("(Could this error message be improved",)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def whole_sentences(text: str, limit: int = 240) -> str:
    """The first line of ``text`` cut to whole sentences: as many as fit in ``limit`` characters,
    at least one (never cut mid-word), without library boilerplate."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    kept: list[str] = []
    for sentence in _SENTENCE_END.split(lines[0]):
        if sentence.startswith(_BOILERPLATE) or (kept and len(" ".join([*kept, sentence])) > limit):
            break
        kept.append(sentence)
    return " ".join(kept) or lines[0]
