"""Every command the README and docs/ show still parses: `dse.sweep` and `dse.train` overrides compose into valid
configs, the report's, deploy's and models' arguments are accepted, `make` targets exist. (The README's test command
is what CI runs; commands on a user's own space files are run by test_sweep's space tests.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from dse.config import DataConfig, TrainConfig, register_schemas, to_object
from dse.deploy.__main__ import parser as deploy_parser
from dse.models import ModelConfig
from dse.models.__main__ import parser as models_parser
from dse.report.__main__ import parse_args as report_args
from dse.sweep.compose import compose, typed

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OWN_FILES = ("./spaces/", "myconf")  # a user's own space files: tests/test_sweep.py runs those commands


def _commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every `python -m dse.X ...` and `make X` in an indented code block."""
    found = []
    for page in PAGES:
        for line in page.read_text().splitlines():
            if not line.startswith("    ") or any(f in line for f in OWN_FILES):
                continue
            for command in line.split("&&"):
                words = shlex.split(command.split("  #")[0])
                words = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]  # environment assignments
                if len(words) > 2 and words[1] == "-m" and words[2].startswith("dse."):
                    found.append((page.name, words[2:]))
                elif words[:1] == ["make"]:
                    found.append((page.name, words))
    return found


COMMANDS = _commands()


def test_the_pages_show_commands_of_every_tool():
    tools = {argv[0] for _, argv in COMMANDS}
    assert {"dse.sweep", "dse.train", "dse.report", "dse.deploy", "dse.models"} <= tools


@pytest.mark.parametrize("page, argv", COMMANDS, ids=[f"{p}:{' '.join(a)}"[:90] for p, a in COMMANDS])
def test_a_documented_command_is_accepted(page, argv, tmp_path):
    tool, args = argv[0], argv[1:]
    if tool == "dse.sweep" and args != ["--list"]:
        typed(compose(args))
    elif tool == "dse.train":
        register_schemas()
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = hydra_compose("run", overrides=args)
        for schema, node in ((ModelConfig, cfg.model), (DataConfig, cfg.data), (TrainConfig, cfg.train)):
            to_object(schema, node)
    elif tool == "dse.report":
        report_args(args)
    elif tool == "dse.deploy":
        deploy_parser().parse_args(args)
    elif tool == "dse.models":
        models_parser().parse_args(args)
    elif tool == "make":
        targets = re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.M)
        assert all(a in targets for a in args if "=" not in a), args
