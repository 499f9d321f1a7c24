"""Every command's flags come from its settings dataclass: each setting is a flag, with the field's default, and
what the parser gives back builds the same settings as the library's defaults."""

from dataclasses import MISSING, fields

import pytest

from esd.cli import build_parser
from esd.eval import EvalConfig, ReportConfig
from esd.reproduce import ReproduceConfig
from esd.train import ESDConfig

COMMANDS = {"train": (ESDConfig, ["--prompt", "cat", "--train_method", "xattn"]),
            "evaluate": (EvalConfig, ["--images", "i", "--out", "o"]),
            "report": (ReportConfig, ["a", "--out", "o"]),
            "reproduce": (ReproduceConfig, ["nudity", "--prompts", "p", "--out", "o"])}


def settings(config_class):
    return [f for f in fields(config_class) if f.init and f.metadata.get("cli", True)]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_setting_is_a_flag_with_its_default(command):
    config_class, required = COMMANDS[command]
    args = vars(build_parser().parse_args([command, *required]))
    declared = settings(config_class)
    assert len(declared) >= 5
    for f in declared:
        assert f.name in args, f"{command}: setting {f.name} has no flag"
        if f.default is not MISSING:
            assert args[f.name] == f.default, (command, f.name)
        assert f.metadata.get("help"), f"{command}: setting {f.name} has no help text"


def test_train_flags_keep_the_papers_names_and_aliases():
    """The paper's script's flag names (and the original code's misspelling) parse to the settings."""
    args = build_parser().parse_args(["train", "--prompt", "cat", "--train_method", "xattn", "--seperator", ",",
                                      "--device", "cpu", "--out", "runs", "--lr", "2e-5", "--no-frozen_copy"])
    assert (args.separator, args.devices, args.save_path, args.lr, args.frozen_copy) == (",", "cpu", "runs", 2e-5,
                                                                                         False)
