"""The README is the front door: its commands must be the ones CI and users actually run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = _bash_blocks(readme)
    setup, test = blocks[0], blocks[1]
    assert setup == ['pip install torch==2.13.0 && pip install -e ".[test]"', "decollapse train dense"]
    assert test == ["python -m pytest -q"]
    ci_commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert ci_commands[-1] == test[0]
    assert "torch==2.13.0" in ci and '-e ".[test]"' in ci


def test_readme_lists_every_registered_architecture_as_available():
    from decollapse.registry import ARCHITECTURES

    readme = (ROOT / "README.md").read_text()
    for name in ARCHITECTURES:
        assert re.search(rf"\| `{name}` .*\| \*\*available\*\* \|", readme), f"{name} missing from the README table"
    available = re.findall(r"\| `(\w+)` [^|]*\| \*\*available\*\*", readme)
    assert set(available) == set(ARCHITECTURES), "the status column claims only what is registered"
