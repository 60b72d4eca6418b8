"""Every public name imports from `unmask`, and importing the package alone pulls in no torch."""

import subprocess
import sys

import unmask


def test_every_public_name_imports():
    for name in unmask.__all__:
        assert getattr(unmask, name) is not None, name
    wanted = {
        "generate",
        "build_decoder",
        "preset_config",
        "PRESETS",
        "DecodeState",
        "sample",
        "train",
        "load_checkpoint",
        "KVCache",
        "evaluate_perplexity",
        "Config",
        "load_config",
    }
    assert wanted <= set(unmask.__all__)
    assert 25 <= len(unmask.__all__) <= 40


def test_public_names_are_the_defining_objects():
    from unmask.decoding.generate import generate
    from unmask.decoding.presets import preset_config

    assert unmask.generate is generate and unmask.preset_config is preset_config


def test_unknown_name_is_an_attribute_error():
    try:
        unmask.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_import_and_help_do_not_load_torch():
    code = (
        "import sys, unmask, unmask.cli.main as m\n"
        "p = m.build_parser()\n"
        "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if k.startswith('unmask'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
