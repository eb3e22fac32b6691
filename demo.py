"""Draw a digit, watch the network think: a local web page for the models in the store.

    python demo.py                 # http://127.0.0.1:<free port>, the address printed
    python demo.py port=7860
"""

from experiments.cli import run

if __name__ == "__main__":
    run("demo")
