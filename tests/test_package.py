"""The package as users get it: every submodule reachable from `import jaxembed`, and the license.

Imports run in a fresh interpreter: this process has imported everything already.
"""

import pathlib
import subprocess
import sys

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parent.parent
PUBLIC_MODULES = sorted(
    path.stem for path in (ROOT / "jaxembed").glob("*.py") if not path.stem.startswith("_")
)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )


def test_every_submodule_is_an_attribute_after_import_jaxembed():
    assert {"nnx", "lora", "sharding", "linen", "functional"} <= set(PUBLIC_MODULES)
    result = run_python(
        "import sys, types, jaxembed\n"
        # flax.nnx is imported on first access only, for import time.
        "assert 'jaxembed.nnx' not in sys.modules\n"
        "jaxembed.nnx.Embedding, jaxembed.lora.merge_lora, jaxembed.sharding.vocab_parallel_apply\n"
        "jaxembed.linen.Embedding, jaxembed.functional.apply, jaxembed.constraints.get\n"
        "jaxembed.regularizers.get, jaxembed.initializers.get\n"
        f"for name in {PUBLIC_MODULES!r}:\n"
        "    assert isinstance(getattr(jaxembed, name), types.ModuleType), name\n"
        "    assert name in jaxembed.__all__ and name in dir(jaxembed), name\n"
        "assert jaxembed.nnx is sys.modules['jaxembed.nnx']\n"
    )
    assert result.returncode == 0, result.stderr


def test_interop_needs_no_optional_dependency_to_import():
    result = run_python(
        "import sys, jaxembed\n"
        "import jaxembed.interop.keras, jaxembed.interop.peft, jaxembed.interop.torch\n"
        "assert jaxembed.interop is sys.modules['jaxembed.interop']\n"
        "loaded = [m for m in ('h5py', 'safetensors', 'keras', 'torch') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    assert result.returncode == 0, result.stderr


def test_all_and_dir_are_truthful():
    result = run_python(
        "import jaxembed\n"
        "names = dir(jaxembed)\n"
        "assert 'nnx' in names and names == sorted(names), names\n"
        "for name in jaxembed.__all__:\n"
        "    assert name in names, name\n"
        "    getattr(jaxembed, name)\n"
        "namespace = {}\n"
        "exec('from jaxembed import *', namespace)\n"
        "assert set(jaxembed.__all__) <= set(namespace)\n"
        "try:\n"
        "    jaxembed.no_such_name\n"
        "except AttributeError as error:\n"
        "    assert 'no_such_name' in str(error)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    assert result.returncode == 0, result.stderr


def test_license_file_is_apache_2_and_declared_for_the_wheel():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"  # PEP 639 SPDX expression
    # setuptools puts these in the wheel's .dist-info/licenses/.
    assert pyproject["project"]["license-files"] == ["LICENSE"]
    # PEP 639 metadata needs setuptools 77 or later as the build backend.
    assert "setuptools>=77" in pyproject["build-system"]["requires"]
