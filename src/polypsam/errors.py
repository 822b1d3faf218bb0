"""Errors a user can act on: each names the file at fault and the fix."""


class PolypSamError(Exception):
    """Base class: printed as a single line by the command-line entry points."""


class DataError(PolypSamError, ValueError):
    """A data file or folder that cannot be used as it is."""


class CheckpointError(PolypSamError, FileNotFoundError):
    """A model or training checkpoint that is missing, corrupt or of another kind."""


class ConfigError(PolypSamError, ValueError):
    """A combination of settings that cannot work together."""
