"""Shared CLI plumbing: run an absl main and turn user errors into one line."""

import sys

from maejax.errors import UserError


def run_cli(app, main) -> int:
    """`app.run(main)`, printing a UserError as one line on stderr with exit code 2."""

    def guarded(argv):
        try:
            main(argv)
        except UserError as e:
            print(f"maejax: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    app.run(guarded)
    return 0
