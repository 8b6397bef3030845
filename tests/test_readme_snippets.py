"""Every ```python block in README.md runs as written: top to bottom, each in a fresh namespace.

An HTML comment on the line before a block says how to run it:
`<!-- snippet: 8 devices -->` runs it in a subprocess with 8 simulated CPU devices (XLA fixes
the device count when JAX's backend starts, and this process has started it with one), and
`<!-- snippet: raises NAME -->` expects it to raise an exception of class NAME.
Tracebacks point at README.md's own line numbers.
"""

import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

BLOCK = re.compile(
    r"^(?:<!-- snippet: (?P<marker>[^\n]*?) -->\n)?```python\n(?P<code>.*?)^```$", re.S | re.M
)
EIGHT_DEVICES = "8 devices"
RAISES = re.compile(r"raises (\w+)")


class Snippet(NamedTuple):
    code: str  # padded with newlines so that line numbers are README.md's
    marker: str | None
    line: int


def snippets() -> list[Snippet]:
    found = []
    for match in BLOCK.finditer(README):
        first_line = README.count("\n", 0, match.start("code"))
        found.append(Snippet("\n" * first_line + match["code"], match["marker"], first_line + 1))
    return found


SNIPPETS = snippets()


def test_every_python_block_is_found():
    assert len(SNIPPETS) == README.count("```python") >= 10


def snippet_id(snippet: Snippet) -> str:
    heading = re.findall(r"^## (.+)$", README[: README.index(snippet.code.lstrip("\n"))], re.M)
    return f"line{snippet.line}-" + re.sub(r"\W+", "-", heading[-1]).strip("-").lower()


def run_in_process(code: str) -> None:
    exec(compile(code, str(ROOT / "README.md"), "exec"), {"__name__": "__readme__"})


def run_on_8_devices(code: str, tmp_path: pathlib.Path) -> None:
    env = {
        **os.environ,
        # Appended, so flags the user set (dumps, ...) still apply.
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "TMPDIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-10000:]


@pytest.mark.parametrize("snippet", SNIPPETS, ids=snippet_id)
def test_snippet_runs(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a snippet writes stays out of the checkout
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # tempfile.mkdtemp() goes here too
    if snippet.marker is None:
        run_in_process(snippet.code)
    elif snippet.marker == EIGHT_DEVICES:
        run_on_8_devices(snippet.code, tmp_path)
    elif expected := RAISES.fullmatch(snippet.marker):
        # The class is checked by name: JAX's error classes need not be importable by that name.
        with pytest.raises(Exception) as raised:
            run_in_process(snippet.code)
        assert raised.type.__name__ == expected[1], raised.getrepr()
    else:
        pytest.fail(f"README.md line {snippet.line}: unknown snippet marker {snippet.marker!r}")
