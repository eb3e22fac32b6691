"""The life of an MLflow run: started or resumed, ended FINISHED / FAILED / KILLED, and found dead.

Every run records where it runs (``host``, ``pid`` and the process's start time, so a reused pid
is not mistaken for the run's process). Runs of this host left RUNNING by a process that is gone
are marked KILLED by the next command that looks at the store.
"""

import contextlib
import signal
import threading
import traceback
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from experiments.errors import ServerAway, UserError
from experiments.store.runs import mark_dead_runs, process_tags

# The signals that end a run KILLED like Ctrl-C: a kill (scancel, a preemption, SLURM's time limit) and SLURM's
# warning before the time limit (submitit asks for SIGUSR2; its own handler would requeue the job mid-run).
INTERRUPTS = (signal.SIGTERM, signal.SIGUSR2)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR2: 140}  # 128 + the signal's number
received: int | None = None  # the signal ``raise_interrupted`` got since ``catch_interrupts`` (or ``keep_interrupt``)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or one of ``INTERRUPTS`` during a run; the run is already marked KILLED."""

    def __init__(self, run_id: str, signum: int):
        super().__init__(f"run {run_id} interrupted by signal {signum}")
        self.run_id, self.exit_code = run_id, EXIT_CODES.get(signum, 130)


def catch_interrupts() -> None:
    """From now on ``INTERRUPTS`` end a run as Ctrl-C does (``raise_interrupted``); none received yet."""
    global received
    received = None
    for signum in INTERRUPTS:
        signal.signal(signum, raise_interrupted)


def raise_interrupted(signum, frame):
    """A signal handler for ``INTERRUPTS``: they end a run as Ctrl-C does (KILLED, resumable). The signal is also
    kept (``interruption``)."""
    global received
    received = signum
    raise KeyboardInterrupt(signum)


def keep_interrupt(signum, frame):
    """The signal handler inside ``interrupts_held`` and ``interrupts_kept``: the first Ctrl-C or one of
    ``INTERRUPTS`` is kept in ``received``; a second one is raised at once (``raise_interrupted``: Ctrl-C twice
    stops now)."""
    global received
    if received is not None:
        raise_interrupted(signum, frame)
    received = signum


@contextlib.contextmanager
def interrupts_held():
    """In the block, the Ctrl-C and ``INTERRUPTS`` that would raise KeyboardInterrupt are kept in ``received``
    (``keep_interrupt``): the first is let go, the next is raised. Marking a run KILLED happens in such a block: a
    second Ctrl-C that came while the run's tag or status was being written left it FAILED, reported as interrupted
    before it started; a third still cuts an end that hangs short. Signals handled otherwise (ignored, their
    default action, another handler) stay so. Yields whether it kept them: outside the main thread, where no
    signal handler runs, nothing changes."""
    global received
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    received = None
    raising = (signal.default_int_handler, raise_interrupted)
    handlers = {signum: handler for signum in (signal.SIGINT, *INTERRUPTS)
                if (handler := signal.getsignal(signum)) in raising}
    for signum in handlers:
        signal.signal(signum, keep_interrupt)
    try:
        yield True
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def interrupts_kept():
    """In the block, Ctrl-C and ``INTERRUPTS`` are kept as in ``interrupts_held``: the block looks at ``received``
    and stops where it safely can (``experiments.run.callbacks.StopOnInterrupt``), and its end raises the kept signal
    as ``raise_interrupted`` does.

    Raised wherever the main thread happens to be in a training step (TensorFlow's C++ calling back into
    Python) or in an epoch's logging, a KeyboardInterrupt was seen to abort the process in glibc (``free():
    invalid next size``) or to leave an sqlite store locked mid-write, before the run was marked KILLED."""
    with interrupts_held() as kept:
        yield
    if kept and received is not None:
        raise KeyboardInterrupt(received)


def signal_of(interrupt: KeyboardInterrupt) -> int:
    """The signal behind a KeyboardInterrupt: the one ``raise_interrupted`` passed, else Ctrl-C."""
    return interrupt.args[0] if interrupt.args and isinstance(interrupt.args[0], int) else signal.SIGINT


def interruption(error: BaseException) -> int | None:
    """The signal that ``error`` stopped a run for: a KeyboardInterrupt's, or the one ``raise_interrupted`` got when
    library code turned its KeyboardInterrupt into an error of its own (TensorFlow, interrupted while it traces a
    tf.data function, raises AttributeError: 'dict' object has no attribute '_type_spec'); None for a failure."""
    return signal_of(error) if isinstance(error, KeyboardInterrupt) else received


# --- Start, resume, end -----------------------------------------------------------------------------


@contextlib.contextmanager
def tracked_run(experiment_id: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None,
                run_id: str | None = None):
    """An MLflow run (a new one, or ``run_id`` resumed) that ends FINISHED, FAILED (error kept as tag
    and artifact) or KILLED (Ctrl-C, ``INTERRUPTS``: raised on as ``Interrupted``); when its tracking
    server went away (``ServerAway``), its end waits in the run's outbox with what else could not
    be sent.

    Whatever was logged before the failure stays in the run.
    """
    tags = {**tags, **process_tags()}
    if run_id:
        with contextlib.suppress(MlflowException):
            MlflowClient().delete_tag(run_id, "error")  # the error of the interruption being resumed
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                          run_name=None if run_id else run_name, tags=tags,
                          parent_run_id=None if run_id else parent_run_id) as run:
        try:
            yield run
        except ServerAway as e:  # the server is away: its end is queued with the rest
            e.outbox.end("FINISHED")
            with contextlib.suppress(Exception):
                mlflow.end_run()  # forgets the run here (MLflow pops it before it tries the server)
            raise
        except BaseException as e:
            signum = interruption(e)
            if signum is not None:
                with interrupts_held():
                    mlflow.set_tag("error", f"interrupted (signal {signal.Signals(signum).name})")
                    mlflow.end_run("KILLED")
                raise Interrupted(run.info.run_id, signum) from None
            mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
            with contextlib.suppress(OSError, MlflowException):  # e.g. the artifact folder is what failed
                mlflow.log_text(traceback.format_exc(), "error.txt")
            mlflow.end_run("FAILED")
            raise


# --- Resume -----------------------------------------------------------------------------------------


RESUMABLE = ("KILLED", "FAILED")
FREE_KEYS = ("tracking.", "resume")  # where the run is stored, not what it is


@dataclass(frozen=True)
class Resume:
    """A run to continue and the config it continues with."""

    run_id: str
    cfg: DictConfig


def resumable_run(client: MlflowClient, run_id: str) -> Run:
    """The run, if it can be continued: KILLED, FAILED, or RUNNING with its process gone."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"resume={run_id}: no such run in {client.tracking_uri}.") from None
    if run.info.status == "RUNNING" and "pid" in run.data.tags:
        mark_dead_runs(client, [run.info.experiment_id])
        run = client.get_run(run_id)
    if run.info.status not in RESUMABLE:
        where = f" (process {run.data.tags.get('pid')} on {run.data.tags.get('host')})" * (run.info.status == "RUNNING")
        raise UserError(f"resume={run_id}: the run is {run.info.status}{where}; only KILLED or FAILED runs, or runs "
                        "whose process died, can be resumed.")
    if run.data.tags.get("sweep_parent") == "true":
        raise UserError(f"resume={run_id} is a sweep's parent run: resume the sweep with -m <its overrides> "
                        "sweep_resume=<sweep id>.")
    return run


def resume_config(client: MlflowClient, run: Run, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The run's logged config (the source of truth), with this command's tracking settings and, if
    given, more ``trainer.epochs``; any other override would change the experiment and is refused."""
    logged = OmegaConf.create(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml"))
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "trainer.epochs":
            continue
        if not key.startswith(FREE_KEYS):
            raise UserError(f"resume={run.info.run_id}: {override} would change the experiment; with resume= only "
                            "trainer.epochs (to grow) and tracking.* may be given.")
    if cfg.trainer.epochs < logged.trainer.epochs and any(o.startswith("trainer.epochs=") for o in overrides):
        raise UserError(f"trainer.epochs may only grow on resume: the run has {logged.trainer.epochs}, "
                        f"got {cfg.trainer.epochs}.")
    if any(o.startswith("trainer.epochs=") for o in overrides):
        logged.trainer.epochs = cfg.trainer.epochs
    logged.tracking = cfg.tracking
    logged.resume = run.info.run_id
    return logged
