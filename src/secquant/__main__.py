"""`python -m secquant`: the same CLI as the `secquant` console script."""

from .cli import main

main()
