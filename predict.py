"""Predict the class of your own images (photos or scans of digits) with a model from the store.

    python predict.py images=my_digit.jpg                    # the champion / best lenet run
    python predict.py images=scans/ recursive=true explain=true
    python predict.py images=digit.png run_id=<id>           # or model_uri=models:/lenet-lab-lenet@champion
"""

from experiments.cli import run

if __name__ == "__main__":
    run("predict")
