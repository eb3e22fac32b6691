# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. From layers to LeNet
#
# Notebooks 1–3 took single layers apart. LeNet stacks them: conv 6@5×5 → max pool → conv 16@5×5 → max pool →
# flatten → dense 120 → dense 84 → dense 10 with a softmax (44,426 weights, counted in notebook 1). Here we
# train it, and its **scratch twin** (the same network built from the lab's own layers, whose backward passes
# are the formulas of notebook 2), through the same function `python train.py` calls, open the MLflow runs they
# log, and read a photographed digit the way `predict.py` does.
#
# To stay quick, each run sees 4,096 training images for one epoch (the `debug=tiny` preset with a larger
# training set, in batches of 32, and with the plots it leaves out): enough to learn the digits well above
# chance, far from a real training run.

# %%
import lesson  # first: TensorFlow then starts quietly

# isort: split
import matplotlib.pyplot as plt
import mlflow
import numpy as np
from IPython.display import Image as Picture
from IPython.display import Markdown, display
from mlflow import MlflowClient
from PIL import Image

from experiments import PROJECT_ROOT
from experiments.apps.predict import predict_batch, prepare_file
from experiments.run.training import train
from experiments.store.logged import load_model
from experiments.store.runs import runs_uri
from experiments.use import images

uri = lesson.store_uri()
mlflow.set_tracking_uri(uri)
SHORT = ["debug=tiny", "trainer.plots=true", "data.train_size=4096", "trainer.batch_size=32", f"tracking.uri={uri}"]
print("tracking store:", uri)

# %% [markdown]
# ## Train the twins
#
# `experiments.run.training.train` is the whole of a `train.py` run: load the data, build the model, fit it,
# evaluate it on the test set and log everything to MLflow. Both runs use seed 0, so they start from the same
# weights and see the batches in the same order. Before fitting, the scratch run checks its first batch's
# gradients against the built-in twin (`trainer.gradcheck`, notebook 2's check on the whole model).

# %%
builtin = train(lesson.train_config("model=lenet", *SHORT))

# %%
scratch = train(lesson.train_config("model=lenet_scratch", *SHORT))

# %% [markdown]
# Same start, same data, same math: the two runs end in the same place, up to the order in which floating-point
# sums are added.

# %%
client = MlflowClient(uri)
histories = {name: client.get_metric_history(result.run_id, "val_loss")
             for name, result in [("builtin", builtin), ("scratch", scratch)]}
for name, result in [("builtin", builtin), ("scratch", scratch)]:
    print(f"{name:8} test accuracy {result.test_accuracy:.4f}  test loss {result.test_loss:.4f}")
assert builtin.test_accuracy > 0.5, "one epoch on 4,096 images learns the digits well above chance (10 %)"
assert abs(builtin.test_accuracy - scratch.test_accuracy) <= 2 / 256  # at most two of the 256 test images differ
assert abs(builtin.test_loss - scratch.test_loss) <= 1e-2 * builtin.test_loss
assert abs(histories["builtin"][-1].value - histories["scratch"][-1].value) <= 1e-2 * histories["builtin"][-1].value

# %% [markdown]
# ## Open a run
#
# Everything a run knows is in the tracking store: its settings (params), its numbers (metrics, per epoch where
# they change), and files (artifacts) such as the plots below. `make ui` shows the same in a browser.

# %%
run = client.get_run(builtin.run_id)
print({key: run.data.params[key] for key in ("model.name", "data.train_size", "trainer.epochs", "seed")})
print({key: round(value, 4) for key, value in sorted(run.data.metrics.items())
       if key in ("test_accuracy", "test_loss", "val_accuracy", "parameter_count", "epoch_seconds")})
plots = [item.path for item in client.list_artifacts(builtin.run_id, "plots")]
print("plots:", plots)
assert run.data.metrics["parameter_count"] == 44_426
assert {"plots/feature_maps.png", "plots/misclassified.png", "plots/first_conv_filters.png"} <= set(plots)


def show_artifact(run_id, path):
    display(Picture(filename=mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                                 tracking_uri=uri)))


# %% [markdown]
# The first conv layer's six 5×5 kernels, and what every conv layer makes of the first test image: each
# **feature map** is one kernel slid over its input (notebook 1), after the ReLU.

# %%
show_artifact(builtin.run_id, "plots/first_conv_filters.png")
show_artifact(builtin.run_id, "plots/feature_maps.png")

# %% [markdown]
# The mistakes: test images the model got wrong, with what it said and what they are.

# %%
show_artifact(builtin.run_id, "plots/misclassified.png")

# %% [markdown]
# The scratch run also logged its gradient check, the table of notebook 2 for every layer of LeNet on the first
# training batch:

# %%
check = mlflow.artifacts.load_text(f"runs:/{scratch.run_id}/gradcheck.md")
display(Markdown(check))
assert "gradient check passed" in check

# %% [markdown]
# ## Read a photographed digit
#
# A digit a user photographs is nothing like MNIST's: dark ink on light, uneven paper, anywhere in the frame,
# any size. `predict.py` brings it into MNIST's form first (`experiments/use/images.py`): find the ink whatever
# the light, crop to it, scale its longer side to 20 pixels, and centre it by its centre of mass in a 28×28
# field, as MNIST's digits were made. No photo ships with the lab, so we make one: the first MNIST test digit
# (a 7), enlarged, written in dark ink off-centre on a page lit from one side, with sensor noise, saved as JPEG.

# %%
with np.load(PROJECT_ROOT / "data" / "mnist.npz") as mnist:
    digit, label = mnist["x_test"][0], int(mnist["y_test"][0])
rng = np.random.default_rng(0)
ink = np.asarray(Image.fromarray(digit).resize((150, 150), Image.Resampling.LANCZOS), np.float64) / 255
page = np.zeros((260, 340))
page[40:190, 150:300] = np.clip(ink, 0, 1)  # off-centre: up and to the right
light = np.linspace(0.95, 0.65, page.shape[1])[None, :]  # brighter on the left
gray = light * (1 - 0.8 * page) + rng.normal(0, 0.02, page.shape)
photo = lesson.work_dir("photos") / "seven.jpg"
Image.fromarray((np.clip(gray, 0, 1) * 255).astype(np.uint8)).convert("RGB").save(photo, quality=85)

# %% [markdown]
# Each step of `images.prepare`, on that file:

# %%
rgb = images.read_image(photo)
strength = images.ink_map(images.shrink(images.to_grayscale(rgb)))
cleaned = images.clean(strength, str(photo))
boxed = images.fit_box(images.crop_to_ink(cleaned))
centred = images.centre_by_mass(boxed)
steps = [(rgb, "the photo"), (strength, "ink strength"), (cleaned, "paper and noise removed"),
         (boxed, f"cropped, 20 px box {boxed.shape}"), (centred, "centred by mass, 28×28"), (digit, "MNIST's own")]
fig, axes = plt.subplots(1, len(steps), figsize=(16, 3))
for ax, (picture, title) in zip(axes, steps, strict=True):
    ax.imshow(picture, cmap=None if picture.ndim == 3 else "gray")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
fig.tight_layout()

assert max(boxed.shape) == 20
np.testing.assert_array_equal(centred, images.prepare(rgb, (28, 28, 1), str(photo))[..., 0])
similarity = np.corrcoef(centred.ravel(), digit.ravel())[0, 1]
print(f"correlation of the prepared photo with MNIST's digit: {similarity:.3f}")
assert similarity > 0.8

# %% [markdown]
# Now the way `predict.py` does it, with its own functions: load each twin's logged model (`runs:/<id>/model`,
# with the normalisation it was trained with), prepare the file, predict.

# %%
answers = {}
for name, result in [("builtin", builtin), ("scratch", scratch)]:
    loaded = load_model(runs_uri(result.run_id))
    [answer] = predict_batch(loaded, [prepare_file(photo, loaded.data.input_shape)])
    answers[name] = answer
    print(f"{name:8} reads {answer.classes[0]} ({answer.probabilities[0]:.1%}); then "
          + ", ".join(f"{c} ({p:.1%})" for c, p in zip(answer.classes[1:3], answer.probabilities[1:3], strict=True)))

fig, ax = plt.subplots(figsize=(6, 2.5))
order = np.argsort([int(c) for c in answers["builtin"].classes])
ax.bar(range(10), np.asarray(answers["builtin"].probabilities)[order])
ax.set(xticks=range(10), xlabel="class", ylabel="probability", title="the builtin LeNet on the photo")
fig.tight_layout()

assert answers["builtin"].classes[0] == answers["scratch"].classes[0] == str(label)
np.testing.assert_allclose(answers["builtin"].probabilities, answers["scratch"].probabilities, atol=1e-2)

# %% [markdown]
# Next: [5. Comparing architectures](05_comparing_architectures.py) trains several architectures over several
# seeds and asks which differences are real.
