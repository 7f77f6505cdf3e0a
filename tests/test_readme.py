"""CI proves the README's two set-up commands: they must appear in .ci/run exactly as written."""

import re
from pathlib import Path


def readme_commands() -> list[str]:
    block = re.search(r"## Set up and run.*?```bash\n(.*?)```", Path("README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("pip install")]


def test_ci_runs_both_readme_commands_verbatim():
    commands = readme_commands()
    assert len(commands) == 2
    ci_lines = Path(".ci/run").read_text().splitlines()
    for command in commands:
        assert command in ci_lines, f".ci/run does not run the README command: {command}"


def test_readme_config_keys_exist():
    from esr.config import load_config

    for key in ("train.steps=3", "train.batch_size=2", "rollout.horizon=full", "rollout.n=50",
                "rollout.max_new_tokens=400", "train.finetune=full", "loss.kind=sampled"):
        load_config("configs/quickstart.yaml", [key])
