"""`python -m aosae ...` (and `torchrun -m aosae train ...`) run the CLI."""
from aosae.cli import exit_process, main

exit_process(main())
