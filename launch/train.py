"""Train over a plan of years: `deepspeed|torchrun|python launch/train.py --config configs/x.yaml`."""

import sys

from trainer.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
