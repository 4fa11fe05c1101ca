"""The `moca` command explains itself: every option has help text, `moca pretrain --help` and
`moca finetune --help` list every config key with its default and docstring, and `--print-config`
prints the resolved config as YAML that reads back to the same config."""

import argparse
import subprocess
import sys

import pytest
import yaml

from megatron_moca.cli import build_parser
from megatron_moca.config.describe import config_keys


def _parsers(parser, path=("moca",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_option_and_command_has_help_text():
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{' '.join(path)} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help:
                missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")
    assert not missing, missing


@pytest.mark.parametrize("command, klass", [("pretrain", "PretrainConfig"), ("finetune", "FinetuneConfig")])
def test_training_help_lists_every_config_key_with_default_and_docstring(command, klass):
    from megatron_moca.config import finetune, pretrain

    cls = getattr(pretrain if command == "pretrain" else finetune, klass)
    out = subprocess.run([sys.executable, "-m", "megatron_moca.cli", command, "--help"], capture_output=True,
                         text=True).stdout
    for key, default, doc in config_keys(cls):
        assert f"  {key} = {default!r}\n" in out, key
        assert doc and doc.split()[0] in out.split(f"  {key} = {default!r}\n", 1)[1][:200], key


def test_print_config_round_trips(tmp_path):
    from megatron_moca.config.loading import build
    from megatron_moca.config.pretrain import PretrainConfig, load_pretrain_config

    proc = subprocess.run([sys.executable, "-m", "megatron_moca.cli", "pretrain", "--config",
                           "examples/pretrain_tiny_cpu.yaml", "--print-config", "optim.lr=3e-4", "data.weights=1,2"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    printed = build(PretrainConfig, yaml.safe_load(proc.stdout))
    assert printed == load_pretrain_config("examples/pretrain_tiny_cpu.yaml", ["optim.lr=3e-4", "data.weights=1,2"])
    assert printed.optim.lr == 3e-4 and printed.data.weights == [1.0, 2.0] and printed.model.language.num_layers == 4
