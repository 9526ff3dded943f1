"""The docs against the code, so neither can drift: every option, flag, command, metric, audit event and
error message the docs name exists (and every one the code has is documented), and every
`docker volume create` example in them is a valid volume."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from plugin import cli
from plugin.core import metrics
from plugin.core.spec import FILE_OPTION_PREFIXES, SCALAR_OPTIONS, parse_spec

ROOT = Path(__file__).resolve().parent.parent
DOCS = {p.name: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
SOURCE = "\n".join(p.read_text() for p in sorted((ROOT / "plugin").rglob("*.py")))


def test_every_volume_option_is_in_the_options_reference():
    table = DOCS["options.md"]
    for option in SCALAR_OPTIONS:
        assert f"`{option}=" in table, f"option {option} is not documented in docs/options.md"
    for prefix in FILE_OPTION_PREFIXES:
        assert f"`{prefix}<file>=" in table, f"options {prefix}<file> are not documented"


def test_every_serve_flag_is_in_the_setup_table_and_back():
    documented = set(re.findall(r"^\| `(--[a-z-]+)`", DOCS["setup.md"], re.M))
    documented |= {
        flag for pair in re.findall(r"^\| `(--[a-z-]+)` / `(--[a-z-]+)`", DOCS["setup.md"], re.M) for flag in pair
    }
    flags = {opt for param in cli.serve.params for opt in param.opts if opt.startswith("--")}
    assert flags - documented == set(), "serve flags missing from docs/setup.md"
    assert documented - flags == set(), "docs/setup.md documents flags serve does not have"


def test_every_documented_command_exists():
    commands = set(cli.main.list_commands(None))
    for name, text in DOCS.items():
        # A command line, not the AppRole named vault-secrets-plugin in a Vault path.
        for command in re.findall(r"(?<![/\w-])vault-secrets-plugin ([a-z]+)", text):
            assert command in commands, f"{name} names the command {command!r}, which does not exist"


def test_metrics_table_matches_the_metrics():
    documented = {
        name.removesuffix("_total") for name in re.findall(r"^\| `(vault_secrets_[a-z_]+)", DOCS["operations.md"], re.M)
    }
    # prometheus_client keeps a counter's name without its _total suffix.
    defined = {m._name for m in vars(metrics).values() if hasattr(m, "_name") and hasattr(m, "collect")}
    assert documented == defined


def test_audit_events_table_matches_the_events_the_code_emits():
    documented = set(
        re.findall(r"`([a-z]+\.[a-z]+|mount|unmount)`", DOCS["operations.md"].split("| event |")[1].split("\n\n")[0])
    )
    emitted = set(re.findall(r'"event": "([a-z.]+)"', SOURCE))
    assert documented == emitted


@pytest.mark.parametrize("message", re.findall(r"^### `([^`]+)`", DOCS["troubleshooting.md"], re.M))
def test_each_troubleshooting_message_is_one_the_plugin_gives(message):
    # Messages with a placeholder (`<file>`) or split by "..." are checked piece by piece.
    for piece in re.split(r"<[a-z]+>|\.\.\.", message):
        piece = piece.strip("` ")
        if piece:
            assert piece in SOURCE, f"troubleshooting.md quotes {piece!r}, which the plugin never says"


def _volume_examples():
    for name, text in DOCS.items():
        for block in re.findall(r"```\n(.*?)```", text, re.S):
            command = block.replace("\\\n", " ")
            for line in command.splitlines():
                if "docker volume create" in line:
                    yield pytest.param(line, id=f"{name}:{line[:40]}")


@pytest.mark.parametrize("line", list(_volume_examples()))
def test_docker_volume_create_examples_are_valid_volumes(line):
    words = shlex.split(line[line.index("docker volume create") :])
    options = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "-o")
    parse_spec(options)
