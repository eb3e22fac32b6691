"""The lab's own exceptions, at the bottom of every import: each command turns them into one line and an exit
code (``experiments.cli``)."""


class UserError(Exception):
    """A problem the user can fix (bad setting, missing data); reported in one line, no traceback, exit code 2."""


class RunFailed(RuntimeError):
    """A run that stopped FAILED for a reason its message says (printed in one line with ``advice``, exit code 1)."""

    advice = "the run is marked FAILED"


class ServerAway(Exception):
    """The tracking server did not come back before the run ended; its outbox (``experiments.store.offline.Outbox``)
    is on disk."""

    def __init__(self, outbox):
        super().__init__(f"{len(outbox.items)} deliveries to {outbox.tracking_uri} are pending in {outbox.folder}")
        self.outbox = outbox
