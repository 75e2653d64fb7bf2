"""Typed errors raised at the boundary that can explain them.

Every message says what is wrong and what to do about it, in words a
biologist can act on; the app shows the message, never a traceback.
"""

from contextlib import contextmanager


class ACsleuthError(Exception):
    """Base class for every error ACsleuth raises on purpose."""


class InputError(ACsleuthError, ValueError):
    """The data given to ACsleuth cannot be used as it is."""


class FileFormatError(InputError):
    """A file could not be read: wrong format, wrong extension, corrupt."""


class FileTooLargeError(InputError):
    """A file is larger than the configured limit."""


class MatrixTooLargeError(InputError):
    """A matrix declares more values than the configured limit, or does not fit in memory."""


class EmptyDataError(InputError):
    """A data set has no cells or no genes, or too few to work with."""


class DuplicateNamesError(InputError):
    """Cell or gene names are not unique."""


class NonFiniteValuesError(InputError):
    """The expression matrix holds NaN or infinite values."""


class ValueRangeError(InputError):
    """The matrix holds values far too large to be expression measurements."""


class ValueKindError(InputError):
    """The values are not what was declared (raw counts vs log-normalised), or are neither."""


class GeneOverlapError(InputError):
    """Reference and target share too few genes."""


class ModelError(ACsleuthError):
    """A saved model is missing, incomplete or does not fit the data."""


class JobBusyError(ACsleuthError):
    """The same work is already running (one job per run and stage)."""


class Cancelled(ACsleuthError):
    """Work was cancelled by the user."""


@contextmanager
def memory_error_as_input(task: str):
    """Turn a ``MemoryError`` inside the block into a :class:`MatrixTooLargeError` saying it could not ``task``."""
    try:
        yield
    except MemoryError as err:
        raise MatrixTooLargeError(
            f"This server has not enough memory to {task}: give fewer cells or genes (e.g. one sample "
            "at a time, or the filtered rather than the raw 10x matrix), or run ACsleuth on a machine "
            "with more memory."
        ) from err
