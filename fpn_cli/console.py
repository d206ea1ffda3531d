"""The console script: ``fpn-extract`` as the shell runs it.

Ctrl-C handling (signals.py) is in place before anything heavy is imported (torch takes a second
or two), and both stop signals are ignored once the command is over, so no Ctrl-C, at any moment
from start-up to the interpreter's exit, ends in a traceback. The package's ``__init__`` imports
lazily for the same reason.
"""

from __future__ import annotations

import sys

from fpn_cli.run import signals


def main() -> None:
    signals.install()
    try:
        from fpn_cli.cli import main as command
    except KeyboardInterrupt as e:  # while starting up: nothing was done
        signals.ignore()
        sys.stderr.write("Interrupted before any image was processed\n")
        sys.exit(signals.interrupted_status(e))
    try:
        command()  # click's standalone mode: always ends in SystemExit
    finally:
        signals.ignore()
