"""``python -m deploycomp`` (and ``torchrun -m deploycomp train ...``) runs the CLI."""

from .cli import main

main()
