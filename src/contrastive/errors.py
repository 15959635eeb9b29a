"""The one exception family the library raises for bad input or a run that must stop.

The CLI prints these as a one-paragraph message and exits with status 2; any other exception is a bug
and keeps its traceback.
"""


class ContrastiveError(Exception):
    """Base class: the message names the file or field at fault and says what to do."""


class ConfigError(ContrastiveError):
    """A config key, value or recipe is wrong."""


class DataError(ContrastiveError):
    """A dataset path is missing, a file is unreadable, or labels are needed and absent."""


class CheckpointError(ContrastiveError):
    """A checkpoint is missing, unreadable or does not match the run."""


class OutOfSpaceError(ContrastiveError):
    """A file could not be written whole because its disk is full (what was there before is untouched)."""


class NonFiniteLossError(ContrastiveError):
    """Training produced a NaN or infinite loss."""
