"""Shared CLI plumbing: parse flags and run an absl main, turning user errors into one line."""

import os
import sys
import traceback

from absl import flags

from maejax.errors import UserError


def fail(message: str) -> None:
    print(f"maejax: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _chain(error: BaseException):
    """`error` and the exceptions it was raised from or while handling."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _config_files(argv) -> set:
    """Absolute paths of the config files named by --config=FILE[:ARG] in argv."""
    paths = set()
    for arg in argv[1:]:
        if arg.startswith("--config="):
            paths.add(os.path.abspath(arg.split("=", 1)[1].split(":", 1)[0]))
    return paths


def raised_in_config_file(error: BaseException, argv) -> BaseException | None:
    """The exception of `error`'s chain whose traceback passes through a config file, if any.

    Such an exception is a bug in the file's get_config() (or in what it
    calls), not a mistake in a --config.FIELD override, and keeps its traceback.
    """
    files = _config_files(argv)
    for e in _chain(error):
        frames = traceback.extract_tb(e.__traceback__)
        if any(os.path.abspath(frame.filename) in files for frame in frames):
            return e
    return None


def report_config_bug(error: BaseException) -> None:
    print("maejax: error: the config file raised an exception in get_config():", file=sys.stderr)
    traceback.print_exception(error, file=sys.stderr)
    sys.exit(1)


def parse_flags(argv):
    """absl flag parsing where a bad --config.FIELD=VALUE is one line, not a traceback.

    ml_collections raises plain Python errors for an unknown field; absl
    reports a value of the wrong type as a flags.Error. Both become
    'maejax: error: --config.FIELD=VALUE: ...' and exit code 2. A UserError
    raised by a config file (an argument it refuses) is one line too; any
    other exception from inside the config file is a bug there and is shown
    with its traceback (file, line, exception), exit code 1.
    """
    try:
        return flags.FLAGS(argv)
    except Exception as e:
        user_error = next((x for x in _chain(e) if isinstance(x, UserError)), None)
        if user_error is not None:
            fail(str(user_error))
        bug = raised_in_config_file(e, argv)
        if bug is not None:
            report_config_bug(bug)
        if isinstance(e, flags.Error):
            fail(str(e))
        if isinstance(e, (AttributeError, KeyError)):
            name = str(e).strip("\"'")
            culprits = [a for a in argv[1:] if a.startswith("--config.") and name in a.split("=")[0]]
            fail(f"{' '.join(culprits) or name}: the config has no field {name!r}")
        if isinstance(e, (TypeError, ValueError)):
            fail(f"cannot apply the --config overrides: {e}")
        raise


def run_cli(app, main) -> int:
    """`app.run(main)`, printing a UserError as one line on stderr with exit code 2."""

    def guarded(argv):
        try:
            main(argv)
        except UserError as e:
            fail(str(e))

    app.run(guarded, flags_parser=parse_flags)
    return 0
