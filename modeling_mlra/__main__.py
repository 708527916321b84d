"""`python -m modeling_mlra ...` is the `mlra` command."""

from .cli import main

main()
