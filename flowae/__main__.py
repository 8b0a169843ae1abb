"""`python -m flowae`: the version, and each command with what it needs and whether it is here."""

from __future__ import annotations

import sys

from flowae import __version__
from flowae.commands import COMMANDS, missing_modules


def main() -> None:
    if sys.argv[1:] and sys.argv[1] not in ("-h", "--help", "-V", "--version"):
        print(f"python -m flowae: error: takes no arguments (got {sys.argv[1]!r}); run a command "
              "below instead", file=sys.stderr)
        sys.exit(2)
    print(f"flowae {__version__}")
    if sys.argv[1:] and sys.argv[1] in ("-V", "--version"):
        return
    print("commands (each takes --help):")
    for command in COMMANDS:
        missing = missing_modules(command)
        state = f"needs pip install 'flowae[{command.extra}]'" if missing else "installed"
        print(f"  {command.name:<14} {command.summary} [{state}]")


if __name__ == "__main__":
    main()
