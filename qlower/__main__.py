"""``python -m qlower`` runs the command line."""

from .cli import main

main()
