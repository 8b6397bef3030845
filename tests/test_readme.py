"""README's two commands stay true: CI runs README's test command, and the example exists."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def bash_blocks():
    return re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)


def test_ci_runs_readme_test_command():
    test_command = bash_blocks()[1].strip()
    assert test_command.endswith("pytest")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci_lines]


def test_main_example_exists():
    example_command = bash_blocks()[0]
    script = re.search(r"python (examples/\S+\.py)", example_command).group(1)
    assert (ROOT / script).is_file()
