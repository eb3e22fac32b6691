"""Config composition for every option, the model builders, and the early errors for bad settings."""

import re
from dataclasses import fields, is_dataclass
from typing import get_args

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import OmegaConf

from experiments import PROJECT_ROOT
from experiments.config import (
    CHECKS,
    RULES,
    CompareConfig,
    DemoConfig,
    PredictConfig,
    SGDConfig,
    TrainConfig,
    TrainerConfig,
    TuneConfig,
    composition_error,
)
from experiments.errors import UserError
from experiments.run.data import load_dataset
from experiments.run.training import validate
from models.architectures import build_model
from tests.conftest import CONF_DIR, compose_train, run_train

MODELS = sorted(p.stem for p in (PROJECT_ROOT / "conf/model").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (PROJECT_ROOT / "conf/data").glob("*.yaml"))
PARAMS = {  # on 28x28x1 inputs with 10 classes
    "lenet": 44_426,
    "lenet_scratch": 44_426,
    "simple_conv": 13_610,
    "simple_conv_scratch": 13_610,
    "lenet5_classic": 61_706,
    "lenet5_classic_scratch": 61_706,
    "vgg_tiny": 45_444,
    "vgg_tiny_scratch": 45_444,
    "lenet_wide": 80_202,
    "lenet_wide_scratch": 80_202,
    "bn_cnn": 198_442,  # 640 of them batch normalization's moving means and variances
    "bn_cnn_scratch": 198_442,
    "bn_tiny": 17_522,  # 208 moving means and variances
    "bn_tiny_scratch": 17_522,
}


def test_every_model_has_a_known_parameter_count():
    assert sorted(PARAMS) == sorted(MODELS)  # a new model needs its count here, a removed one loses it


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes_and_builds_on_every_dataset(model, data):
    cfg = compose_train([f"model={model}", f"data={data}"])
    validate(cfg)
    assert cfg.model.name == model and cfg.data.name == data
    assert cfg.model.layers == ("scratch" if model.endswith("_scratch") else "builtin")
    net = build_model(cfg.model, cfg.data.input_shape, len(cfg.data.class_names))
    assert net.output_shape == (None, len(cfg.data.class_names))
    if data == "mnist" and model in PARAMS:
        assert net.count_params() == PARAMS[model]


def test_defaults_are_lenet_on_bundled_mnist():
    cfg = compose_train()
    assert (cfg.model.name, cfg.data.name, cfg.optimizer.name) == ("lenet", "mnist", "adam")
    assert 1 <= cfg.trainer.epochs <= 10
    assert cfg.data.val_size == 5000 and cfg.tracking.uri is None


def test_scratch_twin_differs_from_its_builtin_only_in_name_and_layers():
    builtin = OmegaConf.to_container(compose_train(["model=lenet"]).model)
    scratch = OmegaConf.to_container(compose_train(["model=lenet_scratch"]).model)
    assert {k for k in builtin if builtin[k] != scratch[k]} == {"name", "layers"}


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.epochs=0", "trainer.epochs must be an integer >= 1, got 0"),
        ("trainer.batch_size=-4", "trainer.batch_size must be an integer >= 1, got -4"),
        ("optimizer.learning_rate=0", "optimizer.learning_rate must be a number > 0 (not inf or nan), got 0"),
        ("optimizer=sgd optimizer.learning_rate=-0.1",
         "optimizer.learning_rate must be a number > 0 (not inf or nan), got -0.1"),
        ("optimizer.schedule=linear", "optimizer.schedule must be constant or cosine, got 'linear'"),
        ("optimizer.name=rmsprop", "optimizer.name must be adam or sgd, got 'rmsprop'"),
        ("model.layers=numpy", "model.layers must be builtin or scratch, got 'numpy'"),
        ("model.architecture=resnet", "model.architecture must be one of ['bn_cnn', "),
        ("data.max_shift=-1", "data.max_shift must be an integer >= 0, got -1"),
    ],
)
def test_invalid_settings_name_the_field_and_value(override, message):
    cfg = compose_train(override.split())
    with pytest.raises(UserError, match=re.escape(message)):
        validate(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.val_size=60000", "data.val_size must be between 1 and 59999 for mnist, got 60000"),
        ("data.train_size=55001", "data.train_size must be between 1 and 55000"),
        ("data.test_size=0", "data.test_size must be between 1 and 10000, got 0"),
    ],
)
def test_invalid_data_sizes_name_the_field_and_value(override, message):
    with pytest.raises(UserError, match=message):
        load_dataset(compose_train([override]).data)


def test_train_py_reports_a_bad_setting_in_one_line_before_training(tmp_path, tracking_uri):
    result = run_train(["trainer.epochs=0", f"tracking.uri={tracking_uri}"], tmp_path)
    assert result.returncode == 2
    assert "error: trainer.epochs must be an integer >= 1, got 0." in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # stopped before any run was created


def test_unknown_group_option_names_the_group_and_the_value(tmp_path):
    result = run_train(["model=resnet152"], tmp_path)
    assert result.returncode != 0
    assert "model/resnet152" in result.stderr
    assert "lenet_scratch" in result.stderr  # Hydra lists the available options


def test_help_lists_the_config_groups_and_their_options(tmp_path):
    result = run_train(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for group, option in [("model", "lenet_scratch"), ("data", "cifar10"), ("optimizer", "sgd"),
                          ("trainer", "default"), ("tracking", "default")]:
        assert f"{group}: " in result.stdout and option in result.stdout


# --- Every bad setting: one line naming the field and the value --------------------------------------------

URI_FORMS = "null, sqlite:///<path>, http(s)://<host> or postgresql://<host>/<database>"
SEED = "seed must be an integer in [0, 4294967295], got"
POSITIVE = "must be an integer >= 1, got"
LEARNING_RATE = "optimizer.learning_rate must be a number > 0 (not inf or nan), got"
MOMENTUM = "optimizer.momentum must be a number in [0, 1], got"
MEAN = "data.mean must be a list of numbers (not inf or nan), one per image channel, got"
STD = "data.std must be a list of numbers > 0 (not inf or nan), one per image channel, got"
SHAPE = "data.input_shape must be [height, width, channels]: 3 integers >= 1, got"
EXPLAIN = "explain must be off, maps, saliency, smoothgrad, ig or gradcam (true: maps, false: off), got"
NAME = "must be a non-empty name, got ''."
FILE_STORE = ("is a file store, which MLflow 3.17 refuses; use a sqlite database, e.g. "
              "tracking.uri=sqlite:///mlflow.db (relative to the project root).")

BAD_SETTINGS = [  # (overrides, the exact message); "  " separates overrides
    # wrong types: OmegaConf refuses them while Hydra composes
    ("seed=abc", f"{SEED} 'abc'."),
    ("seed=true", f"{SEED} True."),  # True is an int in Python, not here
    ("seed=1.5", f"{SEED} 1.5."),
    ("seed=null", f"{SEED} None."),
    ("trainer.epochs=[1,2]", f"trainer.epochs {POSITIVE} [1, 2]."),
    ("data.train_size=abc", "data.train_size must be an integer >= 1 or null (all), got 'abc'."),
    ("data.max_shift=2.5", "data.max_shift must be an integer >= 0, got 2.5."),
    ("data.val_size=true", f"data.val_size {POSITIVE} True."),
    ("optimizer.learning_rate=abc", f"{LEARNING_RATE} 'abc'."),
    ("optimizer.learning_rate=true", f"{LEARNING_RATE} True."),
    ("data.std=0.3", f"{STD} 0.3."),
    ("data.std=[abc]", f"{STD} 'abc' at data.std[0]."),
    ("data.input_shape=[28,28,1.5]", f"{SHAPE} 1.5 at data.input_shape[2]."),
    ("model.name=[a,b]", "model.name must be a non-empty name, got ['a', 'b']."),
    ("seed=[", "cannot parse 'seed=[': no viable alternative at input '['."),
    # ranges
    ("seed=-1", f"{SEED} -1."),
    ("seed=4294967296", f"{SEED} 4294967296."),
    ("trainer.epochs=0", f"trainer.epochs {POSITIVE} 0."),
    ("trainer.batch_size=-4", f"trainer.batch_size {POSITIVE} -4."),
    ("trainer.steps_per_execution=0", f"trainer.steps_per_execution {POSITIVE} 0."),
    ("optimizer.learning_rate=0", f"{LEARNING_RATE} 0.0."),
    ("optimizer=sgd  optimizer.learning_rate=-0.1", f"{LEARNING_RATE} -0.1."),
    ("optimizer=sgd  optimizer.momentum=-1", f"{MOMENTUM} -1.0."),
    ("optimizer=sgd  optimizer.momentum=1.5", f"{MOMENTUM} 1.5."),
    ("data.val_size=0", f"data.val_size {POSITIVE} 0."),
    ("data.train_size=0", "data.train_size must be an integer >= 1 or null (all), got 0."),
    ("data.test_size=-1", "data.test_size must be an integer >= 1 or null (all), got -1."),
    ("data.max_shift=-1", "data.max_shift must be an integer >= 0, got -1."),
    ("data.max_shift=28", "data.max_shift must be smaller than the images (28x28 pixels), got 28."),
    # NaN and inf, zero or negative std
    ("optimizer.learning_rate=inf", f"{LEARNING_RATE} inf."),
    ("optimizer.learning_rate=nan", f"{LEARNING_RATE} nan."),
    ("optimizer=sgd  optimizer.momentum=nan", f"{MOMENTUM} nan."),
    ("data.std=[inf]", f"{STD} [inf]."),
    ("data.mean=[nan]", f"{MEAN} [nan]."),
    ("data.std=[0.0]", f"{STD} [0.0]."),
    ("data.std=[-1]", f"{STD} [-1.0]."),
    # empty strings
    ("tracking.experiment=''", f"tracking.experiment {NAME}"),
    ("model.name=''", f"model.name {NAME}"),
    ("data.name=''", f"data.name {NAME}"),
    ("resume=''", "resume must be a non-empty string or null, got ''."),
    # unknown choices
    ("optimizer.name=rmsprop", "optimizer.name must be adam or sgd, got 'rmsprop'."),
    ("optimizer.schedule=linear", "optimizer.schedule must be constant or cosine, got 'linear'."),
    ("model.architecture=resnet",
     "model.architecture must be one of ['bn_cnn', 'bn_cnn_no_bn', 'bn_cnn_no_dropout', 'bn_tiny', 'lenet', "
     "'lenet5_classic', 'lenet_wide', 'simple_conv', 'vgg_tiny'], got 'resnet'."),
    ("model.layers=numpy", "model.layers must be builtin or scratch, got 'numpy'."),
    ("data.source=csv", "data.source must be npz or keras, got 'csv'."),
    ("data.source=keras  data.name=svhn",
     "data.name must be one of cifar10, cifar100, fashion_mnist, mnist with data.source=keras, got 'svhn'."),
    ("model=resnet152", "model must be one of bn_cnn, bn_cnn_scratch, bn_tiny, bn_tiny_scratch, lenet, "
                        "lenet5_classic, lenet5_classic_scratch, lenet_scratch, lenet_wide, lenet_wide_scratch, "
                        "simple_conv, simple_conv_scratch, vgg_tiny, vgg_tiny_scratch, got 'resnet152' "
                        "(no config model/resnet152)."),
    # tracking URIs
    ("tracking.uri=bogus://x", f"tracking.uri must be {URI_FORMS}, got 'bogus://x'."),
    ("tracking.uri=sqlite:///", f"tracking.uri must be {URI_FORMS}, got 'sqlite:///'."),
    ("tracking.uri=http://", f"tracking.uri must be {URI_FORMS}, got 'http://'."),
    ("tracking.uri=file:///tmp/mlruns", f"tracking.uri 'file:///tmp/mlruns' {FILE_STORE}"),
    ("tracking.uri=/tmp/mlruns", f"tracking.uri '/tmp/mlruns' {FILE_STORE}"),
    ("tracking.local_dir=''", "tracking.local_dir must be a non-empty string or null, got ''."),
    # list lengths
    ("data.mean=[0.1,0.2]",
     "data.mean must be 1 number, one per channel of data.input_shape [28, 28, 1], got [0.1, 0.2]."),
    ("data=cifar10  data.std=[0.25]",
     "data.std must be 3 numbers, one per channel of data.input_shape [32, 32, 3], got [0.25]."),
    ("data.input_shape=[28,28]", f"{SHAPE} [28, 28]."),
    ("data.input_shape=[28,28,0]", f"{SHAPE} [28, 28, 0]."),
    ("data.class_names=[]", "data.class_names must be a list of 2 or more distinct names, got []."),
    ("data.class_names=[a,a]", "data.class_names must be a list of 2 or more distinct names, got ['a', 'a']."),
    # keys that are no setting, settings removed or unset
    ("trainer.epoch=3", "trainer.epoch is not a setting; did you mean trainer.epochs?"),
    ("optimizer.lr=0.1", "optimizer.lr is not a setting; optimizer has name, learning_rate, schedule, warmup_epochs, "
                         "weight_decay."),
    ("sed=3", "sed is not a setting; did you mean seed?"),
    ("+foo=1", "foo is not a setting; the top level has data, model, optimizer, trainer, tracking, seed, resume, "
               "sweep_resume, hparams."),
    ("+trainer.patience=3",
     "trainer.patience is not a setting; trainer has epochs, batch_size, steps_per_execution, xla, "
     "gradcheck, strategy, keep, plots."),
    ("optimizer.momentum=0.5",
     "optimizer.momentum is not a setting; optimizer has name, learning_rate, schedule, warmup_epochs, weight_decay."),
    ("~seed", f"{SEED} nothing."),
    ("trainer.epochs=???", f"trainer.epochs {POSITIVE} nothing."),
    ("+trainer.epochs=3", "Could not append to config. An item is already at 'trainer.epochs'."),
    # settings that contradict each other
    ("optimizer.name=sgd", "optimizer.name 'sgd' needs optimizer.momentum: choose SGD with optimizer=sgd."),
    ("optimizer=sgd  optimizer.name=adam",
     "optimizer.name 'adam' takes no optimizer.momentum: choose Adam with optimizer=adam."),
    ("data.path=null", "data.path must be a file (relative to the project root) with data.source=npz, got None."),
    ("data.sha256=null", "data.sha256 must be the file's SHA-256 (64 hex digits) with data.source=npz, got None."),
    ("data.sha256=abc", "data.sha256 must be 64 hex digits (the file's SHA-256) or null, got 'abc'."),
    ("trainer.xla=sometimes", "trainer.xla must be true or false, got 'sometimes'."),
    ("trainer.gradcheck=maybe", "trainer.gradcheck must be fail, warn or off, got 'maybe'."),
    ("trainer.strategy=tpu", "trainer.strategy must be auto, mirrored or multi_worker, got 'tpu'."),
    ("sweep_resume=''", "sweep_resume must be a non-empty string or null, got ''."),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay must be a number >= 0, got -0.1."),
    ("optimizer.warmup_epochs=-1", "optimizer.warmup_epochs must be a number >= 0, got -1.0."),
    ("optimizer.warmup_epochs=nan", "optimizer.warmup_epochs must be a number >= 0, got nan."),
    ("trainer.epochs=2  optimizer.warmup_epochs=2",
     "optimizer.warmup_epochs must be less than trainer.epochs (2), got 2.0."),
    ("data.max_rotation=180", "data.max_rotation must be a number of degrees in [0, 180), got 180.0."),
    ("data.max_rotation=-5", "data.max_rotation must be a number of degrees in [0, 180), got -5.0."),
    ("data.max_scale=1", "data.max_scale must be a number in [0, 1), got 1.0."),
    ("data.max_scale=inf", "data.max_scale must be a number in [0, 1), got inf."),
    ("trainer.keep=first", "trainer.keep must be last or best, got 'first'."),
    ("trainer.plots=some", "trainer.plots must be true or false, got 'some'."),
    ("hparams=tuned  hparams.study=''", "hparams.study must be a non-empty name, got ''."),
    ("hparams=tuned  hparams.storage=mysql://x/y", "hparams.storage must be null (beside the tracking store), "
                                                   "sqlite:///<path> or postgresql://<host>/<database>, got 'mysql://x/y'."),
    ("hparams=tuned  hparams.trial=-1",
     "hparams.trial must be an integer >= 0 (a trial's number) or null (the best trial), got -1."),
]


def first_error(overrides: list[str]) -> str:
    """The one line train.py prints for these overrides: what Hydra could not compose, else what validate refuses."""
    try:
        cfg = compose_train(overrides)
    except (ConfigCompositionException, OverrideParseException) as e:
        return composition_error(e)
    with pytest.raises(UserError) as error:
        validate(cfg)
    return str(error.value)


BAD_COMMAND_SETTINGS = [  # compare.py, predict.py, demo.py: the same table of rules, the same one line
    ("compare", "register=maybe", "register must be true or false, got 'maybe'."),
    ("compare", "stale_after_minutes=0", "stale_after_minutes must be a number > 0, got 0."),
    ("compare", "stale_after_minutes=soon", "stale_after_minutes must be a number > 0, got 'soon'."),
    ("compare", "sweep_id=''", "sweep_id must be a non-empty string or null, got ''."),
    ("compare", "filter=''", "filter must be a non-empty string or null, got ''."),
    ("compare", "output_dir=''", "output_dir must be a non-empty string or null, got ''."),
    ("compare", "regster=true", "regster is not a setting; did you mean register?"),
    ("compare", "tracking.uri=/tmp/mlruns", f"tracking.uri '/tmp/mlruns' {FILE_STORE}"),
    ("predict", "images=x  batch_size=0", "batch_size must be an integer >= 1, got 0."),
    ("predict", "", "images must be a file, a folder or a glob, e.g. images=my_digits/, got None."),
    ("predict", "images=x  recursive=deep", "recursive must be true or false, got 'deep'."),
    ("predict", "images=x  explain=sometimes", f"{EXPLAIN} 'sometimes'."),
    ("predict", "images=x  explain=lime", f"{EXPLAIN} 'lime'."),
    ("predict", "images=x  explain=1", f"{EXPLAIN} '1'."),  # the schema's str: 1 arrives as '1'
    ("predict", "images=x  model=resnet", "model must be one of bn_cnn, bn_cnn_scratch, bn_tiny, bn_tiny_scratch, "
                "lenet, lenet5_classic, lenet5_classic_scratch, lenet_scratch, lenet_wide, lenet_wide_scratch, "
                "simple_conv, simple_conv_scratch, vgg_tiny, vgg_tiny_scratch, got 'resnet' (no config model/resnet)."),
    ("predict", "images=x  run_id=''", "run_id must be a non-empty string or null, got ''."),
    ("predict", "images=x  model_uri=''", "model_uri must be a non-empty string or null, got ''."),
    ("demo", "port=70000", "port must be an integer in 1..65535 or null (a free one), got 70000."),
    ("demo", "port=web", "port must be an integer in 1..65535 or null (a free one), got 'web'."),
    ("demo", "method=lime", "method must be saliency, smoothgrad, ig or gradcam, got 'lime'."),
    ("demo", "method=maps", "method must be saliency, smoothgrad, ig or gradcam, got 'maps'."),
    ("tune", "tune.study=''", "tune.study must be a non-empty name, got ''."),
    ("tune", "tune.trials=0", "tune.trials must be an integer >= 1, got 0."),
    ("tune", "tune.epochs=0", "tune.epochs must be an integer >= 1, got 0."),
    ("tune", "tune.pruner=asha", "tune.pruner must be median, hyperband or none, got 'asha'."),
    ("tune", "tune.startup_trials=-1", "tune.startup_trials must be an integer >= 0, got -1."),
    ("tune", "tune.storage=/tmp/optuna.db",
     "tune.storage must be null (beside the tracking store), sqlite:///<path> or postgresql://<host>/<database>, "
     "got '/tmp/optuna.db'."),
    ("tune", "tracking.uri=http://127.0.0.1:5000", "tune.storage must be sqlite:///<path> or "
     "postgresql://<host>/<database> with a tracking server (tracking.uri=http://127.0.0.1:5000 keeps no study), "
     "got None."),
    ("tune", "tune.space.learning_rate.low=0", "tune.space.learning_rate.low must be a number > 0 (not inf or nan), "
                                               "got 0.0."),
    ("tune", "tune.space.learning_rate.high=inf", "tune.space.learning_rate.high must be a number > 0 (not inf or "
                                                  "nan), got inf."),
    ("tune", "tune.space.learning_rate.high=1e-5", "tune.space.learning_rate.high must be >= "
                                                   "tune.space.learning_rate.low (0.0001), got 1e-05."),
    ("tune", "tune.space.learning_rate.log=maybe", "tune.space.learning_rate.log must be true or false, got 'maybe'."),
    ("tune", "tune.space.weight_decay.low=-1", "tune.space.weight_decay.low must be a number >= 0, got -1.0."),
    ("tune", "tune.space.weight_decay.low=0", "tune.space.weight_decay.low must be > 0 with "
                                              "tune.space.weight_decay.log=true, got 0.0."),
    ("tune", "tune.space.weight_decay.high=nan", "tune.space.weight_decay.high must be a number >= 0, got nan."),
    ("tune", "tune.space.weight_decay.log=1.5", "tune.space.weight_decay.log must be true or false, got 1.5."),
    ("tune", "tune.space.batch_size=[]", "tune.space.batch_size must be a list of 1 or more distinct integers >= 1, "
                                         "got []."),
    ("tune", "tune.space.schedule=[cosine,linear]", "tune.space.schedule must be a list of 1 or more of constant, "
                                                    "cosine, got ['cosine', 'linear']."),
    ("tune", "tune.space.max_shift.low=-1", "tune.space.max_shift.low must be an integer >= 0, got -1."),
    ("tune", "tune.space.max_shift.high=28", "tune.space.max_shift.high must be smaller than the images (28x28 "
                                             "pixels), got 28."),
    ("tune", "trainer.strategy=multi_worker", "trainer.strategy multi_worker is not for tuning: start several tune.py "
                                              "processes on one study instead (docs/tuning.md)."),
    ("tune", "tune.trial=3", "tune.trial is not a setting; did you mean tune.trials?"),
]


def test_every_rule_is_tried_by_a_bad_setting():
    tried = {override.split("=")[0].lstrip("+~") for overrides, _ in BAD_SETTINGS for override in overrides.split("  ")}
    tried |= {override.split("=")[0] for _, overrides, _ in BAD_COMMAND_SETTINGS for override in overrides.split("  ")}
    assert sorted(set(RULES) - tried) == []


@pytest.mark.parametrize("command, overrides, message", BAD_COMMAND_SETTINGS,
                         ids=[f"{c}:{o}" for c, o, _ in BAD_COMMAND_SETTINGS])
def test_a_bad_setting_of_any_command_is_one_line(command, overrides, message):
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=command, overrides=[o for o in overrides.split("  ") if o])
    except (ConfigCompositionException, OverrideParseException) as e:
        assert composition_error(e) == message
        return
    with pytest.raises(UserError) as error:
        CHECKS[command](cfg)
    assert str(error.value) == message


@pytest.mark.parametrize("overrides, message", BAD_SETTINGS, ids=[o for o, _ in BAD_SETTINGS])
def test_a_bad_setting_is_one_line_naming_the_field_and_the_value(overrides, message):
    assert first_error(overrides.split("  ")) == message


@pytest.mark.parametrize("overrides", [
    "optimizer=sgd", "optimizer=sgd  optimizer.learning_rate=1e6", "optimizer=sgd  optimizer.momentum=0",
    "optimizer.schedule=constant", "seed=4294967295", "data.train_size=1  data.test_size=1  data.max_shift=0",
    "data.source=keras", "data=cifar10  data.max_shift=31", "tracking.uri=sqlite:///runs/mlflow.db",
    "tracking.uri=https://mlflow.example.com", "tracking.uri=http://127.0.0.1:5000",
    "tracking.uri=postgresql://mlflow@db.example.com/mlflow", "resume=0123456789abcdef",
    "experiment=compare_architectures", "experiment=strong", "experiment=tiny", "experiment=tiny  debug=tiny",
    "experiment=strong  debug=tiny  model.layers=scratch", "experiment=strong_no_bn", "experiment=strong_no_dropout",
    "experiment=strong_no_augmentation", "experiment=strong_no_schedule",
    "data.max_rotation=179.9  data.max_scale=0.99",
])
def test_good_settings_pass(overrides):
    validate(compose_train(overrides.split("  ")))


def test_composed_configs_are_typed_by_their_schemas():
    cfg = compose_train(["optimizer=sgd", "seed='7'", "optimizer.learning_rate=1"])
    assert OmegaConf.get_type(cfg) is TrainConfig and OmegaConf.get_type(cfg.trainer) is TrainerConfig
    assert OmegaConf.get_type(cfg.optimizer) is SGDConfig
    assert cfg.seed == 7 and isinstance(cfg.optimizer.learning_rate, float)  # converted to the field's type


def test_every_setting_of_the_schemas_has_a_rule():
    def settings(schema, prefix=""):
        for field in fields(schema):
            group = next((t for t in (field.type, *get_args(field.type)) if is_dataclass(t)), None)  # or X | None
            if group:
                yield from settings(group, f"{prefix}{field.name}.")
            else:
                yield prefix + field.name

    schemas = (TrainConfig, TuneConfig, CompareConfig, PredictConfig, DemoConfig)
    every_setting = {key for schema in schemas for key in settings(schema)}
    assert every_setting | {"optimizer.momentum"} == set(RULES)


def test_an_untyped_config_is_checked_too():
    """A resumed run's logged config.yaml is plain yaml: the same rules apply to it."""
    logged = OmegaConf.create(OmegaConf.to_yaml(compose_train(["optimizer=sgd"])))
    validate(logged)
    logged.seed = "abc"
    with pytest.raises(UserError, match=r"^seed must be an integer in \[0, 4294967295\], got 'abc'\.$"):
        validate(logged)


THROUGH_TRAIN_PY = [  # (overrides from BAD_SETTINGS, arguments before them)
    ("optimizer.learning_rate=inf", []),
    ("data.std=[0.0]", []),
    ("data.mean=[0.1,0.2]", []),
    ("seed=abc", []),
    ("seed=-1", []),
    ("data.train_size=abc", []),
    ("tracking.experiment=''", []),
    ("optimizer=sgd  optimizer.momentum=-1", []),
    ("trainer.epoch=3", []),
    ("+foo=1", []),
    ("tracking.uri=bogus://x", []),
    ("trainer.epochs=0", ["-m", "model=lenet,simple_conv"]),  # stopped before the sweep's parent run
]


@pytest.mark.parametrize("overrides, sweep", THROUGH_TRAIN_PY, ids=[" ".join([*a, o]) for o, a in THROUGH_TRAIN_PY])
def test_train_py_stops_a_bad_setting_in_one_line_creating_nothing(tmp_path, tracking_uri, overrides, sweep):
    uri = [] if "tracking.uri=" in overrides else [f"tracking.uri={tracking_uri}"]
    result = run_train([*sweep, *overrides.split("  "), *uri], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {dict(BAD_SETTINGS)[overrides]}"
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # no MLflow database, no artifacts, no Hydra output folder


def test_predict_takes_the_model_whose_champion_it_uses_from_the_command_line():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="predict", overrides=["images=x", "model=lenet_scratch"])
    CHECKS["predict"](cfg)
    assert cfg.model.name == "lenet_scratch"
