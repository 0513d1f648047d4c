"""The README's Python examples run as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no ```python example"
    for block in blocks:
        scope: dict = {}
        exec(compile(block, str(README), "exec"), scope)
        if "loss" in scope:
            assert scope["loss"].isfinite().all()
