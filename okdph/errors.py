"""The errors a user can fix, in one module that imports neither torch nor click.

The CLI turns `ConfigError` (and its `CheckpointError`) and `DataError` into one line on stderr and
exit code 2 (the traceback only with --debug); `Preempted` into one line and exit code
`PREEMPTED_EXIT`. Library code raises them; it never prints or exits.
"""
from __future__ import annotations

__all__ = ["PREEMPTED_EXIT", "USER_ERRORS", "CheckpointError", "ConfigError", "DamagedRecord", "DataError",
           "Preempted"]


class ConfigError(ValueError):
    """A user-facing configuration error; its message is one line naming the valid choices."""


class DataError(Exception):
    """A dataset problem the user can fix: missing or corrupted files, an unknown name.

    The message is one line that says what to do (e.g. pass --download or --data-root)."""


class CheckpointError(ConfigError):
    """A checkpoint or trajectory file that cannot be used: truncated, foreign, from another run."""


class DamagedRecord(ConfigError):
    """A run record that cannot be used: unparseable, a field of the wrong type, or trained with
    another recipe than its profile now has. Not counted as recorded: the run trains again and the
    file is set aside as `<name>.corrupt`; the tables count such records per cell and the commands
    name them."""


USER_ERRORS = (ConfigError, DataError)  # one line, exit 2

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"; rerunning the same command resumes


class Preempted(Exception):
    """The run stopped on SIGTERM/SIGUSR1 after writing its resume checkpoint. Not a failure: the
    sweep must stop too (its process was asked to), and a rerun continues."""
