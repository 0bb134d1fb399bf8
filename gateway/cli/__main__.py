"""`python -m gateway.cli ...`: how `serve` starts its runtime child, and how tests run the CLI
without an installed entry point."""

import sys

from gateway.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
