#!/usr/bin/env python
"""Evaluate checkpoints under distribution shifts. See ``python evaluate.py --help``.

python evaluate.py runs/<run> --shifts all --episodes 100
python evaluate.py runs/a runs/b runs/c --shifts none,novel-distractors,view-3 --episodes 50
"""

import sys

from rim_agents.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
