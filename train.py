#!/usr/bin/env python
"""Train a PPO agent with a RIM (or LSTM / GRU) core. See ``python train.py --help``.

python train.py --env BreakoutNoFrameskip-v4 --core rims
python train.py --env BreakoutNoFrameskip-v4 --core lstm
python train.py --resume runs/<run>
"""

import sys

from rim_agents.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
