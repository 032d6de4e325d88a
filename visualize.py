#!/usr/bin/env python
"""Watch an agent and its RIMs: episode videos and activity rasters. See ``python visualize.py --help``.

python visualize.py runs/<run> --episodes 2
python visualize.py runs/<run> --shift novel-distractors --summary --tensorboard
"""

import sys

from rim_agents.cli import visualize_main

if __name__ == "__main__":
    sys.exit(visualize_main())
