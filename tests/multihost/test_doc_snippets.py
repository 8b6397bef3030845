"""The docs' multi-host programs (`<!-- snippet: 2 processes -->` blocks, found by
tests/test_doc_snippets.py, which runs every other block) run as written on 2 processes x 4
simulated CPU devices."""

import importlib.util
import pathlib

import pytest
from workers import run_workers

TESTS = pathlib.Path(__file__).resolve().parent.parent


def _load_snippet_finder():
    spec = importlib.util.spec_from_file_location("doc_snippets", TESTS / "test_doc_snippets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


doc_snippets = _load_snippet_finder()
SNIPPETS = [s for s in doc_snippets.SNIPPETS if s.marker == doc_snippets.TWO_PROCESSES]


def test_the_sharding_guide_has_a_multi_host_program():
    assert any(s.file == "docs/guides/sharding.md" for s in SNIPPETS)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=doc_snippets.snippet_id)
def test_snippet_runs_on_2_processes(snippet, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(snippet.code)  # padded: tracebacks give the Markdown file's line numbers
    results = run_workers(script, timeout=180)
    assert [r.returncode for r in results] == [0, 0]
