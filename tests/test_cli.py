"""The CLI's error reporting: one line for the user's mistakes, a traceback for bugs in a config file.

Overrides (--config.FIELD=VALUE) are checked through a real CLI process in test_faults.py.
"""

import textwrap

import pytest

import maejax.main  # noqa: F401  (defines --config and the other flags)
from maejax import cli


def config_file(tmp_path, body: str) -> str:
    path = tmp_path / "my_config.py"
    path.write_text(
        "from maejax.recipes import fmnist_pretrain\n\n\ndef get_config(arg=None):\n"
        + textwrap.indent(textwrap.dedent(body), "    ")
    )
    return str(path)


def parse(*argv):
    with pytest.raises(SystemExit) as e:
        cli.parse_flags(["maejax", *argv])
    return e.value.code


@pytest.mark.parametrize(
    "body, exception",
    [
        ("c = fmnist_pretrain()\nc.model.encoder.widht\nreturn c\n", "AttributeError"),
        ("c = fmnist_pretrain()\nreturn c.to_dict()['nope']\n", "KeyError: 'nope'"),
        ("raise ValueError('the recipe table is broken')\n", "ValueError: the recipe table is broken"),
    ],
)
def test_a_bug_in_a_config_file_keeps_its_file_line_and_exception(tmp_path, capsys, body, exception):
    path = config_file(tmp_path, body)
    assert parse(f"--config={path}") == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and f'File "{path}", line ' in err and exception in err
    assert "the config has no field" not in err and "cannot apply the --config overrides" not in err


def test_a_config_argument_the_recipe_does_not_take_is_refused(capsys):
    assert parse("--config=configs/mae_vitb.py:L/16") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes no argument (got 'L/16'" in err[0]
