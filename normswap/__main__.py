"""``python -m normswap``: the same command line as ``normswap``."""
from .cli import main

main(prog_name="normswap")
