"""Compare architectures over the finished runs in MLflow: one row per model, mean ± std over seeds.

    python compare.py                                        # every run of experiment lenet-lab
    python compare.py sweep_id=<id>                          # one sweep's runs (report also logged to its parent run)
    python compare.py "filter=\"tags.dataset = 'mnist'\""    # any MLflow search filter
    python compare.py tracking.experiment=scratchpad output_dir=/tmp/report
    python compare.py register=true                          # each model's best run -> lenet-lab-<model>@champion
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments.errors import UserError  # also registers the ${project_root:} resolver


@hydra.main(config_path="conf", config_name="compare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from experiments.apps.compare import ARTIFACT_DIR, compare
    from experiments.config import check_tracking
    from experiments.store.tracking import resolve_tracking_uri

    try:
        check_tracking(cfg.tracking)
        comparison = compare(
            resolve_tracking_uri(cfg.tracking.uri),
            cfg.tracking.experiment,
            sweep_id=None if cfg.sweep_id is None else str(cfg.sweep_id),  # sweep_id=20250101 parses as an int
            extra_filter=cfg.filter,
            output_dir=None if cfg.output_dir is None else Path(cfg.output_dir),
            register=cfg.register,
            stale_after_minutes=cfg.stale_after_minutes,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(comparison.markdown)
    if comparison.parent_run_id:
        print(f"Logged to sweep parent run {comparison.parent_run_id} under {ARTIFACT_DIR}/")
    print(f"Report written to {comparison.output_dir}")


if __name__ == "__main__":
    main()
