"""Help that answers: every flag of every CLI has a help line that states its default."""

import re
import subprocess
import sys

import pytest


def option_blocks(text: str) -> dict[str, str]:
    """{flag: its help text} from argparse's --help output."""
    body = text.split("options:", 1)[1]
    blocks: dict[str, str] = {}
    flag = None
    for line in body.splitlines():
        found = re.match(r"  (-{1,2}[\w-]+)", line)
        if found:
            flag = found.group(1)
            blocks[flag] = line
        elif flag and line.startswith("    "):
            blocks[flag] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("command", [["experiments.gmm"], ["experiments.cifar10", "train"],
                                     ["experiments.cifar10", "analyze"], ["experiments.guidance"],
                                     ["experiments.guidance", "decisions"]])
def test_every_flag_states_its_default(command):
    r = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True, timeout=120,
                       env={"COLUMNS": "200", **__import__("os").environ})
    assert r.returncode == 0, r.stderr
    blocks = option_blocks(r.stdout)
    assert len(blocks) > 8
    for flag, text in blocks.items():
        if flag == "-h":
            continue
        assert "default" in text or "(required)" in text, f"{' '.join(command)} {flag}: {text}"
