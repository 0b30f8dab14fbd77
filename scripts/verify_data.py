"""`make verify-data`: check every file of the configured token corpus (data/integrity.py).

A module of its own so that `python -m` does not run data/integrity.py while the
data package (which imports it) is half-initialised.
"""
import sys

from data.integrity import main

if __name__ == "__main__":
    sys.exit(main())
