"""The command line: every subcommand explains itself, and bad input gives a clear error."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from moeplex.cli import build_parser, main

def all_command_paths(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> list[list[str]]:
    """Every command and subcommand of the parser, as the words that reach it."""
    paths = [list(words)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += all_command_paths(sub, (*words, name))
    return paths


SUBCOMMANDS = all_command_paths(build_parser())


def test_the_cli_has_every_documented_command():
    names = {" ".join(words) for words in SUBCOMMANDS}
    expected = {"demo build", "demo serve", "generate", "eval ppl", "consolidate", "merge", "verify",
                "export", "bench decode", "bench serve", "serve"}
    assert expected <= names, expected - names


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w) or "moeplex")
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*words, "--help"])
    assert exit_info.value.code == 0
    assert "usage: moeplex" in capsys.readouterr().out


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "moeplex.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "bench" in result.stdout


def test_generate_with_a_checkpoint_folder(hf_checkpoint, capsys, tmp_path):
    name, folder, hf_model = hf_checkpoint
    from tests.test_sampling import char_tokenizer

    char_tokenizer(hf_model.config.vocab_size).save_pretrained(folder)
    prompt = "".join(chr(0x4E00 + int(i)) for i in torch.randint(0, hf_model.config.vocab_size, (5,)))
    assert main(["generate", str(folder), "--prompt", prompt, "--max-tokens", "6", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert f"=== {folder.name}" in out and prompt in out


def test_unknown_model_name_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPLEX_CACHE", str(tmp_path))
    assert main(["eval", "ppl", "no-such-model"]) == 1
    assert "no-such-model" in capsys.readouterr().err


def test_building_the_cli_parser_does_not_import_torch():
    """`moeplex --help` stays instant: every subcommand imports its heavy modules only when it runs."""
    code = "import sys, moeplex.cli; moeplex.cli.build_parser(); print(sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
