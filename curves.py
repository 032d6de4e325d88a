#!/usr/bin/env python
"""Training curves as a table: each run's logged metric every N env steps. See ``python curves.py --help``.

python curves.py runs/<run> runs/<other run> --metric success --every 100000
python curves.py runs/<study folder> --metric return --every 50000
"""

import sys

from rim_agents.cli import curves_main

if __name__ == "__main__":
    sys.exit(curves_main())
