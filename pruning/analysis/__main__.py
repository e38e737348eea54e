import sys

from pruning.analysis.cli import main

sys.exit(main())
