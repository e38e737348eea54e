#!/usr/bin/env python
"""Prune a Llama-family model globally: ``python run_global_pruning.py --config configs/llama2_0.2.yaml``."""

import sys

from pruning.cli import main

if __name__ == "__main__":
    sys.exit(main())
