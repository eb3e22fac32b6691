"""The lab's own exceptions, at the bottom of every import, and the one line and exit code each becomes: every
command reports them through ``one_line`` (``experiments.cli``), never with a traceback."""

import sys
import traceback


class UserError(Exception):
    """A problem the user can fix (bad setting, missing data); reported in one line, no traceback."""

    exit_code = 2


class NothingFound(UserError):
    """The store holds nothing the command can work on (e.g. no finished run to compare): the settings are fine."""

    exit_code = 1


class RunFailed(RuntimeError):
    """A run that stopped FAILED for a reason its message says (printed in one line with ``advice``)."""

    advice = "the run is marked FAILED"
    exit_code = 1


class ServerAway(Exception):
    """The tracking server did not come back before the run ended; its outbox (``experiments.store.offline.Outbox``)
    is on disk."""

    def __init__(self, outbox):
        super().__init__(f"{len(outbox.items)} deliveries to {outbox.tracking_uri} are pending in {outbox.folder}")
        self.outbox = outbox


def one_line(error: BaseException) -> tuple[str, int] | None:
    """What a command prints for ``error`` and the exit code it ends with; None for an error that is a bug (its
    traceback shows)."""
    if isinstance(error, UserError):
        return f"error: {error}", error.exit_code
    if isinstance(error, RunFailed):
        return f"error: {error}; {error.advice}", error.exit_code
    if isinstance(error, OSError) and error.filename:  # a folder that cannot be written, a full disk, ...
        return f"error: {error.strerror}: {error.filename}", 1
    return None


def stop(line: str, code: int) -> None:
    """End the command: ``line`` on stderr, exit ``code``."""
    print(line, file=sys.stderr)
    sys.exit(code)


def stop_in_callback(error: Exception) -> None:
    """End the command from a Hydra callback, where Hydra would turn the exception into a warning and go on:
    ``one_line``'s line and exit code, or for a bug its traceback and exit code 1."""
    reported = one_line(error)
    if reported is None:
        traceback.print_exception(error)
        reported = f"error: {type(error).__name__}: {error}", 1
    stop(*reported)
