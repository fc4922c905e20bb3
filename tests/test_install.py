"""The install story (issue 25 item 7): pyproject declares a torch range, the README's commands pin this
machine's CPU build on the same pip line, and .ci/run runs the README's test command exactly."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The pip lines of the README's bash blocks (the main command and the test command)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line for block in blocks[:2] for line in block.splitlines() if line.startswith("pip install")]


def test_pyproject_declares_a_torch_range_from_2_11():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = [d.replace(" ", "") for d in deps if re.match(r"torch\b", d) and not d.startswith("torchmetrics")]
    assert torch == ["torch>=2.11,<3"]


def test_readme_commands_install_the_local_cpu_build():
    main, test = readme_commands()
    assert "pip install torch==2.13.0 -e ." in main
    assert 'torch==2.13.0 -e ".[test]"' in test


def test_ci_runs_the_readme_test_command():
    test = readme_commands()[1]
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
