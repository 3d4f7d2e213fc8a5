"""`python -m aosae ...` (and `torchrun -m aosae train ...`) run the CLI."""
import sys

from aosae.cli import main

sys.exit(main())
