"""Tune each architecture's hyperparameters with one budget of trials, so that comparisons are fair (docs/tuning.md).

    python tune.py model=vgg_tiny                        # a study of 20 trials (tune.trials), validation only
    python tune.py model=vgg_tiny tune.trials=40         # the same study, 20 more trials
    python tune.py -m model=lenet,simple_conv,vgg_tiny   # one study per architecture, the same budget each
    python train.py model=vgg_tiny hparams=tuned         # train at the best setting found
    python tune.py --help                                # config groups and options
"""

from experiments.cli import run

if __name__ == "__main__":
    run("tune")
