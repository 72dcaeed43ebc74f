"""`python -m nextoken ...` (and `torchrun -m nextoken train ...`)."""

from nextoken.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
