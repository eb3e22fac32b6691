"""What a ``layers: scratch`` run adds to a training run: the hand-derived loss it compiles with, and
the gradient check of its first training batch before fitting (``trainer.gradcheck``)."""

import keras
import mlflow
from omegaconf import DictConfig, open_dict

from experiments.errors import RunFailed
from experiments.run.data import Augmentation, Dataset, TrainingBatches
from models.architectures import build_model
from models.gradcheck import check_model
from models.layers import ScratchSparseCategoricalCrossentropy

CHECK_IMAGES = 16  # of the first batch: the check then costs a few % of a 1-epoch run (benchmarks/gradcheck_cost.py)


class GradcheckFailed(RunFailed):
    """The scratch layers disagree with their builtin twins or with central differences: the run
    stops before training and is marked FAILED."""

    advice = "the run is marked FAILED before training"


def training_loss(model_cfg) -> keras.losses.Loss | str:
    """The fused, hand-derived softmax cross-entropy for scratch models; Keras's for builtin ones."""
    if model_cfg.layers == "scratch":
        return ScratchSparseCategoricalCrossentropy()
    return "sparse_categorical_crossentropy"


def gradcheck_first_batch(cfg: DictConfig, model: keras.Model, data: Dataset) -> None:
    """For a scratch model (unless ``trainer.gradcheck=off``): :func:`models.gradcheck.check_model`
    against its builtin twin on the first ``CHECK_IMAGES`` images of the run's first training batch,
    logged as ``gradcheck.md``, the metric ``gradcheck_max_rel_error`` and the tag
    ``gradcheck: passed|failed``. A failed check raises :class:`GradcheckFailed` unless
    ``trainer.gradcheck=warn``."""
    if cfg.model.layers != "scratch" or cfg.trainer.gradcheck == "off":
        return
    twin_cfg = cfg.model.copy()
    with open_dict(twin_cfg):
        twin_cfg.layers = "builtin"
    twin = build_model(twin_cfg, data.input_shape, data.num_classes)
    batches = TrainingBatches(data.x_train, data.y_train, cfg.trainer.batch_size, cfg.seed,
                              Augmentation.of(cfg.data))
    x, y = (t.numpy()[:CHECK_IMAGES] for t in next(iter(batches.dataset)))  # epoch 0's first batch
    table = check_model(model, twin, x, y, cfg.seed)
    verdict = "passed" if table.passed else "failed"
    mlflow.log_text(f"# Gradient check of {cfg.model.name}: {verdict}\n\nOn the first {len(x)} images of the first "
                    f"training batch.\n\n{table.markdown()}\n", "gradcheck.md")
    mlflow.log_metric("gradcheck_max_rel_error", table.max_rel_error)
    mlflow.set_tag("gradcheck", verdict)
    print(f"gradient check {verdict}: max relative error {table.max_rel_error:.1e} (gradcheck.md)", flush=True)
    if not table.passed and cfg.trainer.gradcheck != "warn":
        failed = sum(not row.passed for row in table.rows)
        raise GradcheckFailed(f"gradient check failed ({failed} of {len(table.rows)} checks beyond tolerance, "
                              "table in the run's gradcheck.md); trainer.gradcheck=warn trains anyway")
