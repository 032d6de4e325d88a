#!/usr/bin/env python
"""Run a study spec as Ray tasks: python study.py configs/studies/pickup_robustness.yaml (see --help)."""

from __future__ import annotations

import sys

from rim_agents.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main())
