"""Shared CLI plumbing: parse flags and run an absl main, turning user errors into one line."""

import sys

from absl import flags

from maejax.errors import UserError


def fail(message: str) -> None:
    print(f"maejax: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_flags(argv):
    """absl flag parsing where a bad --config.FIELD=VALUE is one line, not a traceback.

    ml_collections raises plain Python errors for an unknown field; absl
    reports a value of the wrong type as a flags.Error. Both become
    'maejax: error: --config.FIELD=VALUE: ...' and exit code 2.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))
    except (AttributeError, KeyError) as e:
        name = str(e).strip("\"'")
        culprits = [a for a in argv[1:] if a.startswith("--config.") and name in a.split("=")[0]]
        fail(f"{' '.join(culprits) or name}: the config has no field {name!r}")
    except (TypeError, ValueError) as e:
        fail(f"cannot apply the --config overrides: {e}")


def run_cli(app, main) -> int:
    """`app.run(main)`, printing a UserError as one line on stderr with exit code 2."""

    def guarded(argv):
        try:
            main(argv)
        except UserError as e:
            fail(str(e))

    app.run(guarded, flags_parser=parse_flags)
    return 0
