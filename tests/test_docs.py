"""The documentation site builds strictly: `sphinx-build -W` turns every warning (a broken
cross-reference, a missing page, a docstring that does not render) into a failure."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def build(tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    return subprocess.run(
        [*command, "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


def test_site_builds_strictly_with_every_page(tmp_path):
    result = build(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    html = tmp_path / "html"
    pages = {path.relative_to(html).as_posix() for path in html.rglob("*.html")}
    sources = {
        path.relative_to(DOCS).with_suffix(".html").as_posix() for path in DOCS.rglob("*.md")
    }
    sources.discard("README.html")  # the docs' own README is for the repository, not the site
    assert sources <= pages, sorted(sources - pages)
    # The API pages hold the docstrings, signatures included (none is written by hand).
    functional = (html / "api" / "functional.html").read_text()
    assert "jaxembed.functional.apply" in functional and "out_of_range" in functional
    for module in ("lora", "trainable_tokens", "quantization", "nnx", "linen", "interop.keras"):
        assert f"jaxembed.{module}" in (html / "api" / f"{module}.html").read_text()


def test_keras_parity_table_names_every_layer_argument_in_order():
    """The guide's argument table is a name mapping, kept in step with the layer's arguments."""
    from jaxembed import _config

    guide = (DOCS / "guides" / "keras.md").read_text()
    section = guide.split("## Arguments and their Keras names", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(_config.NAMES)
