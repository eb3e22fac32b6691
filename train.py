"""Train a LeNet-family CNN and log the run to MLflow.

    python train.py                                   # LeNet on the bundled MNIST
    python train.py model=lenet_scratch trainer.epochs=3
    python train.py -m model=lenet,simple_conv seed=0,1,2
    python train.py resume=<run id>                   # continue an interrupted run
    python train.py --help                            # config groups and options
"""

from experiments.cli import run

if __name__ == "__main__":
    run("train")
