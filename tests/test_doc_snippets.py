"""Every ```python block of README.md and of docs/**/*.md runs as written: top to bottom, each in
a fresh namespace.

An HTML comment on the line before a block says how to run it (MyST leaves HTML comments out of
the rendered pages): `<!-- snippet: 8 devices -->` runs it in a subprocess with 8 simulated CPU
devices (XLA fixes the device count when JAX's backend starts, and this process has started it
with one), `<!-- snippet: raises NAME -->` expects it to raise an exception of class NAME, and
`<!-- snippet: 2 processes -->` marks a multi-host program, run as 2 processes x 4 devices by
the multi-process suite (tests/multihost/test_doc_snippets.py), not here.
Tracebacks point at the Markdown file's own line numbers.
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
DOCS = ROOT / "docs"
FILES = [
    ROOT / "README.md",
    *sorted(path for path in DOCS.rglob("*.md") if "_build" not in path.relative_to(DOCS).parts),
]
TEXTS = {path.relative_to(ROOT).as_posix(): path.read_text() for path in FILES}

BLOCK = re.compile(
    r"^(?:<!-- snippet: (?P<marker>[^\n]*?) -->\n)?```python\n(?P<code>.*?)^```$", re.S | re.M
)
# Any fence that opens Python code, indented or not, in any spelling: BLOCK must find them all,
# so that no block of Python code goes untested because it is spelled differently.
PYTHON_FENCE = re.compile(
    r"^[ \t]*(?:`{3,}|~{3,})[ \t]*(?:\{[\w-]+\}[ \t]*)?(?:python3?|py|pycon|ipython3?)\b", re.M
)
MARKER = re.compile(r"^<!-- snippet:", re.M)
FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
HEADING = re.compile(r"^#{1,6} (.+)$")
EIGHT_DEVICES = "8 devices"
TWO_PROCESSES = "2 processes"  # run by tests/multihost/test_doc_snippets.py
RAISES = re.compile(r"raises (\w+)")


class Snippet(NamedTuple):
    file: str  # relative to the repository root
    code: str  # padded with newlines so that line numbers are the file's
    marker: str | None
    line: int
    heading: str


def headings(text: str) -> list[tuple[int, str]]:
    """(line number, text) of each Markdown heading, skipping `#` lines inside fenced blocks."""
    found, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        if match := FENCE.match(line):
            if fence is None:
                fence = match[1]
            elif match[1].startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
        elif fence is None and (match := HEADING.match(line)):
            found.append((number, match[1]))
    return found


def snippets(file: str, text: str) -> list[Snippet]:
    titles = headings(text)
    found = []
    for match in BLOCK.finditer(text):
        first_line = text.count("\n", 0, match.start("code"))
        above = [title for number, title in titles if number <= first_line]
        found.append(
            Snippet(
                file,
                "\n" * first_line + match["code"],
                match["marker"],
                first_line + 1,
                above[-1] if above else "",
            )
        )
    return found


SNIPPETS_BY_FILE = {file: snippets(file, text) for file, text in TEXTS.items()}
SNIPPETS = [snippet for found in SNIPPETS_BY_FILE.values() for snippet in found]


@pytest.mark.parametrize("file", TEXTS)
def test_every_python_block_is_found(file):
    text, found = TEXTS[file], SNIPPETS_BY_FILE[file]
    assert len(found) == len(PYTHON_FENCE.findall(text)), (
        f"{file}: a Python block that the snippet tests would not run (indented, or not spelled "
        "```python)"
    )
    with_marker = [snippet for snippet in found if snippet.marker is not None]
    assert len(with_marker) == len(MARKER.findall(text)), (
        f"{file}: a snippet marker that is not on the line just before a ```python block"
    )


def test_the_docs_hold_python_blocks():
    assert SNIPPETS_BY_FILE["README.md"], "README's quickstart runs too"
    guides = [snippet for snippet in SNIPPETS if snippet.file.startswith("docs/guides/")]
    assert len(guides) >= 15 and len(SNIPPETS) >= 20, len(SNIPPETS)


def snippet_id(snippet: Snippet) -> str:
    heading = re.sub(r"\W+", "-", snippet.heading).strip("-").lower()
    return f"{snippet.file}:{snippet.line}-{heading}"


def run_in_process(code: str, file: str) -> None:
    exec(compile(code, str(ROOT / file), "exec"), {"__name__": "__doc_snippet__"})


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


@pytest.mark.parametrize(
    "snippet", [s for s in SNIPPETS if s.marker != TWO_PROCESSES], ids=snippet_id
)
def test_snippet_runs(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a snippet writes stays out of the checkout
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # tempfile.mkdtemp() goes here too
    if snippet.marker is None:
        run_in_process(snippet.code, snippet.file)
    elif snippet.marker == EIGHT_DEVICES:
        run_on_8_devices(snippet.code, tmp_path)
    elif expected := RAISES.fullmatch(snippet.marker):
        # The class is checked by name: JAX's error classes need not be importable by that name.
        with pytest.raises(Exception) as raised:
            run_in_process(snippet.code, snippet.file)
        assert raised.type.__name__ == expected[1], raised.getrepr()
    else:
        where = f"{snippet.file} line {snippet.line}"
        pytest.fail(f"{where}: unknown snippet marker {snippet.marker!r}")
