"""README's two commands stay true: CI runs README's test command, and the example exists."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def bash_blocks():
    return re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)


def test_ci_runs_readme_test_command():
    test_command = bash_blocks()[1].strip()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci_lines]  # verbatim


def test_test_command_runs_every_pytest_invocation():
    # Plain `pytest` leaves tests/multidevice out (it needs 8 devices from the start of its
    # process) and tests/multihost (it starts processes joined by jax.distributed): see
    # tests/conftest.py. The command runs each as an invocation of its own.
    steps = [step.strip() for step in bash_blocks()[1].strip().split("&&")]
    assert steps == [
        'pip install -e ".[test]"',
        "pytest",
        "pytest tests/multidevice",
        "pytest tests/multihost",
    ]
    for folder in ("multidevice", "multihost"):  # never "no tests" (exit 5)
        assert list((ROOT / "tests" / folder).glob("test_*.py"))


def test_main_example_exists():
    example_command = bash_blocks()[0]
    script = re.search(r"python (examples/\S+\.py)", example_command).group(1)
    assert (ROOT / script).is_file()


def test_docs_repeat_the_two_commands_verbatim():
    """The site's landing page and development guide give README's two commands as they are."""
    example_command, test_command = (block.strip() for block in bash_blocks()[:2])
    docs = {
        name: (ROOT / "docs" / name).read_text() for name in ("index.md", "guides/development.md")
    }
    assert example_command in docs["index.md"] and test_command in docs["index.md"]
    assert test_command in docs["guides/development.md"]
