"""`python -m stars_fast` is `python -m stars_fast.train`."""
import sys

from .train import main

main(sys.argv[1:])
