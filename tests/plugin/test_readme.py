"""Every Python block of the README runs as it is written: tests as tests, the rest as scripts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.requires("boxes")
@pytest.mark.parametrize("number", [i for i, block in enumerate(BLOCKS) if "def test_" in block])
def test_readme_test_block_passes(number: int, pytester: pytest.Pytester) -> None:
    block = BLOCKS[number]
    pytester.makepyfile(
        test_readme_block=("import pytest\n\n" if "import pytest" not in block else "") + block
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nsbox-strict", timeout=180)
    tests = len(re.findall(r"^def test_", block, flags=re.M))
    result.assert_outcomes(passed=tests)


@pytest.mark.requires("boxes")
@pytest.mark.parametrize("number", [i for i, block in enumerate(BLOCKS) if "def test_" not in block])
def test_readme_script_block_runs(number: int, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(BLOCKS[number])
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
