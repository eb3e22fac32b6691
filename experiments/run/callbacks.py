"""Keras callbacks of a training run: epoch timing, the per-epoch checkpoint and logging, the stop on a diverged
loss or an interrupt, the epoch of the training batches."""

import math
import time

import keras

from experiments.errors import RunFailed
from experiments.run import lifecycle
from experiments.run.checkpoints import ARTIFACT_DIR, Checkpoints, Kept
from experiments.run.data import TrainingBatches
from experiments.store.offline import Outbox


class Diverged(RunFailed):
    """The training loss became NaN or infinite: the run stops at once and is marked FAILED."""

    advice = "the run is marked FAILED (try a smaller optimizer.learning_rate)"


class EpochTimer(keras.callbacks.Callback):
    """Wall and CPU seconds of each epoch's training pass (up to the start of the validation pass).

    CPU seconds (all threads of the process) are the steadier measure on a shared machine.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.cpu_start, self.seconds = time.perf_counter(), time.process_time(), None

    def stop_clock(self):
        if self.seconds is None:  # the first call of the epoch counts
            self.seconds = time.perf_counter() - self.start
            self.cpu_seconds = time.process_time() - self.cpu_start

    def on_test_begin(self, logs=None):
        self.stop_clock()

    def on_epoch_end(self, epoch, logs=None):
        self.stop_clock()  # an epoch without validation pass


TIMINGS = ("epoch_seconds", "images_per_second", "images_per_cpu_second")  # EpochLogger's metrics of the clock


class EpochLogger(EpochTimer):
    """Ends each epoch that ran whole (not one cut short, ``StopOnInterrupt``): offers it to ``kept`` when given
    (``trainer.keep=best``), then its checkpoint, when given ``checkpoints`` (saved here with the epoch's metrics and
    the kept epoch, then logged as the run's artifact), then its metrics,
    learning rate, training-pass time and throughput, logged to MLflow at step epoch + 1 (a resumed run
    continues the history at the right steps).

    In this order a kill at any point leaves a run whose every logged epoch has its checkpoint: one before the
    checkpoint's rename repeats the epoch on resume; one after it leaves the epoch's metrics in the checkpoint,
    logged when the run is resumed (``experiments.run.training.train``), all but its timings (``TIMINGS``: the
    checkpoint holds what the seed determines)."""

    def __init__(self, num_images: int, outbox: Outbox, checkpoints: Checkpoints | None = None,
                 kept: Kept | None = None):
        super().__init__()
        self.num_images, self.outbox, self.checkpoints, self.kept = num_images, outbox, checkpoints, kept

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.model.stop_training:
            return
        metrics = {k: float(v) for k, v in logs.items()}
        metrics["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        metrics["epoch_seconds"] = self.seconds
        metrics["images_per_second"] = self.num_images / self.seconds
        metrics["images_per_cpu_second"] = self.num_images / self.cpu_seconds
        if self.kept is not None:
            self.kept.offer(epoch + 1, metrics, self.model)
        if self.checkpoints is not None:
            determined = {key: value for key, value in metrics.items() if key not in TIMINGS}
            self.checkpoints.save(self.model, epochs_done=epoch + 1, metrics=determined, kept=self.kept)
            self.outbox.artifact(self.checkpoints.path, ARTIFACT_DIR)
        self.outbox.metrics(metrics, step=epoch + 1)


class StopOnNonFinite(keras.callbacks.Callback):
    """Raises ``Diverged`` as soon as the training loss is NaN or infinite, naming epoch and step
    (1-based; with steps_per_execution > 1 Keras reports every that many steps)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            raise Diverged(f"loss became {loss} at epoch {self.epoch + 1}, step {batch + 1}")


class StopOnInterrupt(keras.callbacks.Callback):
    """Stops training at the end of the batch (``steps_per_execution`` steps) in which a Ctrl-C or one of
    ``lifecycle.INTERRUPTS`` came (kept by ``lifecycle.interrupts_kept``): the epoch ends with
    ``model.stop_training`` set, cut short (or its last batch) and neither logged nor saved; a resumed run
    repeats it whole. One that came after the epoch's last batch (in its validation or logging) stops training
    once the epoch is saved and logged: this callback comes after the one that does it."""

    def on_train_batch_end(self, batch, logs=None):
        self.stop_if_interrupted()

    def on_epoch_end(self, epoch, logs=None):
        self.stop_if_interrupted()

    def stop_if_interrupted(self):
        if lifecycle.received is not None:
            self.model.stop_training = True


class SetEpoch(keras.callbacks.Callback):
    """Tells the training batches which epoch begins: their order and shifts are drawn from it."""

    def __init__(self, batches: TrainingBatches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.epoch.assign(epoch)
