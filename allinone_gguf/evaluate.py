"""`python -m allinone_gguf.evaluate`: the accuracy script, kept at its documented name (it lives in measure/)."""
import sys

from .measure.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
