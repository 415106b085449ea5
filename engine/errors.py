"""The project's one error model. A leaf module: it imports nothing, so every layer (the data
pipeline included) raises these and every entry point catches one type.

An error that reaches an entry point is one line and an exit code, never a traceback:

* ``UserError`` (exit 2): something the user can fix: a config value, a file, a shard folder, a
  world size, a checkpoint, a weights file, a busy run folder, a full disk.
* ``NonFiniteError`` (exit 3): training went non-finite and rollbacks could not fix it.
* ``StalledError`` (exit 4): a rank stopped making progress (the watchdog).
* ``TransientError`` (exit 75, ``EX_TEMPFAIL``): a condition of the moment (object storage
  throttling or unreachable, a full cache disk, a lock held too long) outlasted the patience the
  run was given; what was trained is saved, nothing is recorded against the data, and the same
  command continues once the condition clears (``launchers/pretrain.sh`` starts it again).

Most errors are found identically on every rank (they come from the config, the shared data
view or a checkpoint all ranks read), so only rank 0 prints them: one message per job, not one
per rank. An error that only one rank can see (a JPEG that fails to decode in its share) sets
``rank_local`` and is printed by the rank that raised it.
"""

from __future__ import annotations


class StackError(Exception):
    """Base of every error the entry points report as one line with ``exit_code``."""

    exit_code = 1
    rank_local = False

    def __init__(self, message: str = "", *, rank_local: bool | None = None):
        super().__init__(message)
        if rank_local is not None:
            self.rank_local = rank_local

    def one_line(self) -> str:
        text = " ".join(str(self).split())
        return f"{type(self).__name__}: {text}" if text else type(self).__name__


class UserError(StackError):
    """Fixable by the user; exit code 2."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config value or combination is invalid; the message names the field and what is allowed."""


class DataError(UserError, ValueError):
    """A shard folder is missing, incomplete or inconsistent, or a sample cannot be read."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written, found or read."""


class WeightsError(UserError, ValueError):
    """A weights file or folder is missing, unreadable, or not what it is used as."""


class TeacherError(WeightsError):
    """Teacher weights (CLIP, MAE generator) are missing, malformed, or do not fit the student."""


class UnsafeFileError(WeightsError):
    """A file would need code (or classes outside the allow-list) to be read."""


class RunFolderBusy(UserError, RuntimeError):
    """Another live job holds this run folder."""


class NonFiniteError(StackError, RuntimeError):
    """Training cannot continue without NaN/inf weights; it stops instead of continuing silently."""

    exit_code = 3


class StalledError(StackError, RuntimeError):
    """A rank stopped making progress for longer than the watchdog allows."""

    exit_code = 4


class TransientError(StackError, OSError):
    """A condition of the moment outlasted its patience: retry later (saved first when training)."""

    exit_code = 75  # EX_TEMPFAIL (sysexits.h): schedulers and launchers read it as "try again"
