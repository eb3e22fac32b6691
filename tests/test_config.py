"""Config composition for every option, the model builders, and the early errors for bad settings."""


import pytest
from omegaconf import OmegaConf

from experiments import PROJECT_ROOT, UserError
from experiments.data import load_dataset
from experiments.training import validate
from models.architectures import build_model
from tests.conftest import compose_train, run_train

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
}


def test_every_model_has_a_known_parameter_count():
    assert set(PARAMS) <= set(MODELS)


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes_and_builds_on_every_dataset(model, data):
    cfg = compose_train([f"model={model}", f"data={data}"])
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
        ("optimizer.learning_rate=0", "optimizer.learning_rate must be a number > 0, got 0"),
        ("optimizer=sgd optimizer.learning_rate=-0.1", "optimizer.learning_rate must be a number > 0, got -0.1"),
        ("optimizer.schedule=linear", "optimizer.schedule must be constant or cosine, got 'linear'"),
        ("optimizer.name=rmsprop", "optimizer.name must be adam or sgd, got 'rmsprop'"),
        ("model.layers=numpy", "model.layers must be builtin or scratch, got 'numpy'"),
        ("model.architecture=resnet", "model.architecture must be one of \\['lenet', "),
        ("data.max_shift=-1", "data.max_shift must be an integer >= 0, got -1"),
    ],
)
def test_invalid_settings_name_the_field_and_value(override, message):
    cfg = compose_train(override.split())
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
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
