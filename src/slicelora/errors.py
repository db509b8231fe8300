"""The project's error types: each message says what is wrong, where (file, field) and how to fix it."""

from __future__ import annotations


class SliceLoraError(Exception):
    """Base class of every error that this package raises on purpose."""


class DataError(SliceLoraError, ValueError):
    """A task, sequence or data file is missing or malformed."""


class ConfigError(SliceLoraError, ValueError):
    """A configuration value or key is invalid."""


class InitError(SliceLoraError, ValueError):
    """An adapter initialisation cannot be done on this model or these inputs."""


class RunStateError(SliceLoraError, RuntimeError):
    """A run folder, checkpoint or cache does not match the run that wants to use it."""


class TrainingDiverged(SliceLoraError, RuntimeError):
    """Training produced a non-finite loss or gradient norm: the stage stops and nothing of it is saved."""
