"""``python -m detforge`` (also what ``torchrun -m detforge train ...`` runs)."""

import sys

from detforge.cli import main

if __name__ == "__main__":
    sys.exit(main())
