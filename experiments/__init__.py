"""The lab's application code. Importing it sets up the process: the project root (``${project_root:}`` in
every config), MLflow's usage reports off, and TensorFlow's start-up chatter filtered."""

import contextlib
import gc
import os
import re
import subprocess
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import PathFinder
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# MLflow 3 reports usage to its makers from a thread of every process that imports it (a config download,
# then one POST per logged model, run, ...): a lab's runs stay on its machines, and a machine without
# internet spends nothing waiting for it. Your own MLFLOW_DISABLE_TELEMETRY (or DO_NOT_TRACK) wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def start_up_done() -> None:
    """The end of a process's start-up. Every command starts with Python's garbage collector off
    (``experiments.cli``): importing TensorFlow, Keras, MLflow and Hydra makes hundreds of thousands of long-lived
    objects, which full collections would walk for next to nothing freed. Here what is alive is frozen
    (``gc.freeze``: the collector, on again, never walks it, neither later nor in its last collection at exit) and
    the collector turned back on. Newer objects are collected as usual; where the collector is on, nothing
    changes (docs/performance.md has the figures)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


# Hydra output directories and data paths are anchored here, never at the current directory.
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)


# --- TensorFlow's start-up chatter ----------------------------------------------------------------------

# What TensorFlow prints on a machine without a GPU while it loads and looks for devices, whatever
# TF_CPP_MIN_LOG_LEVEL says: absl's notice and the INFO line of each copy of the CUDA runtime stub (two
# libraries, each with its own absl, print them as they are loaded, before TensorFlow reads the level), and
# cuInit's error 303, which its stub returns when there is no NVIDIA driver (libcuda) to load; on a CPU with
# AVX-512 VNNI/BF16 or AMX, where oneDNN's kernels are on by default, each library's INFO line saying so.
TF_STARTUP_NOISE = re.compile(
    rb"(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|I\d{4} [\d:.]+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\. [^\n]*TF_ENABLE_ONEDNN_OPTS=0`\."
    rb"|I\d{4} [\d:.]+ +\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\."
    rb"|E\d{4} [\d:.]+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit: INTERNAL: CUDA error: "
    rb"Failed call to cuInit: UNKNOWN ERROR \(303\))\r?\n?")

# The filter: every line but the noise, passed on at once. Ctrl-C is for the process it filters, which says
# what happened; the filter ends when that process closes the pipe.
LINE_FILTER = """
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
noise = re.compile(sys.argv[1].encode())
for line in sys.stdin.buffer:
    if not noise.fullmatch(line):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
"""


@contextlib.contextmanager
def stderr_without(noise: re.Pattern[bytes]):
    """File descriptor 2 (Python's and the C++ libraries' stderr) goes through a child process that drops the
    lines matching ``noise`` and passes on the others at once: nothing waits in this process, so what a crash
    in the block (a failed CHECK, an abort) printed still shows."""
    try:
        real_stderr = os.dup(2)
    except OSError:  # started without a stderr: nothing to filter
        yield
        return
    sys.stderr.flush()
    line_filter = subprocess.Popen([sys.executable, "-I", "-S", "-c", LINE_FILTER, noise.pattern.decode()],
                                   stdin=subprocess.PIPE, stdout=real_stderr)
    os.dup2(line_filter.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real_stderr, 2)
        os.close(real_stderr)
        line_filter.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):  # a child started in the block may keep the pipe open
            line_filter.wait(timeout=5)  # its last lines come before anything printed after the block


class QuietTensorFlowStart(MetaPathFinder):
    """Wherever ``tensorflow`` is first imported, its import and its search for devices (where TensorFlow
    prints ``TF_STARTUP_NOISE``) run ``stderr_without`` that noise. Only while TF_CPP_MIN_LOG_LEVEL hides
    TensorFlow's INFO lines (train.py sets 2): with 0 or unset, everything shows."""

    def find_spec(self, name, path=None, target=None):
        spec = PathFinder.find_spec(name, path) if name == "tensorflow" else None
        if spec is None:
            return None
        sys.meta_path.remove(self)  # TensorFlow is imported once (a found spec ends the search: safe to remove)
        if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0":
            return spec
        load = spec.loader.exec_module

        def load_quietly(module):
            with stderr_without(TF_STARTUP_NOISE):
                load(module)
                module.config.list_physical_devices()  # the CUDA platform starts here (cuInit), GPUs stay visible

        spec.loader.exec_module = load_quietly  # this module's loader only
        return spec


if "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, QuietTensorFlowStart())
