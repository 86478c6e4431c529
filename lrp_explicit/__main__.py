"""``python -m lrp_explicit COMMAND …``: see :mod:`lrp_explicit.cli`."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
