"""`python -m unmask ...` (and `torchrun -m unmask ...`) run the command line."""

from unmask.cli.main import main

main()
