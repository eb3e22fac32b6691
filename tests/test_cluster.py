"""Sweeps through hydra-submitit-launcher (the `cluster` extra): submitit_local runs every job of a sweep
as its own process, as submitit_slurm would run it as its own SLURM job."""

import re
from pathlib import Path

import pytest

from tests.conftest import finished_sweep, run_train

pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                    reason="hydra-submitit-launcher is missing: pip install -e '.[cluster]' (make test installs it)")

SEEDS = ["0", "1"]


@pytest.mark.slow
@pytest.mark.scale
def test_a_submitit_local_sweep_runs_each_job_in_its_own_process_under_one_parent(tmp_path, tracking_uri):
    result = run_train(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                        f"seed={','.join(SEEDS)}", "debug=tiny",
                        f"tracking.uri={tracking_uri}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    children = finished_sweep(tracking_uri, SEEDS)
    assert len({r.data.tags["pid"] for r in children}) == len(SEEDS)  # a process per job

    # submitit's own logs, one folder per job in the sweep's folder, each naming the run its job logged
    logs = sorted((tmp_path / "multirun" / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == len(SEEDS)
    logged = {m for log in logs for m in re.findall(r"MLflow run id: (\w+)", Path(log).read_text())}
    assert logged == {r.info.run_id for r in children}
    assert all("submitit INFO" in log.read_text() for log in logs)
