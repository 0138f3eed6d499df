"""`python -m benchmarks [overrides]`; with no arguments, the default sweep (experiment=toy_sweep)."""

import sys

from benchmarks.app import main

if __name__ == "__main__":
    if len(sys.argv) == 1:
        sys.argv.append("experiment=toy_sweep")
    main()
