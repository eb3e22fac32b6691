"""Compare architectures over the finished runs in MLflow: one row per model, mean ± std over seeds.

    python compare.py                                        # every run of experiment lenet-lab
    python compare.py sweep_id=<id>                          # one sweep's runs (report also logged to its parent run)
    python compare.py "filter=\"tags.dataset = 'mnist'\""    # any MLflow search filter
    python compare.py tracking.experiment=scratchpad output_dir=/tmp/report
    python compare.py register=true                          # each model's best run -> lenet-lab-<model>@champion
"""

from experiments.cli import run

if __name__ == "__main__":
    run("compare")
