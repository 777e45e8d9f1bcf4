"""`python -m extproc.emulator`: see extproc.emulator.cli for flags."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
