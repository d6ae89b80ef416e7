"""The README's example runs as written."""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README lost its example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_is_a_front_page():
    """Under 15 KB, with the test command CI runs word for word; the depth lives in docs/."""
    text = README.read_text()
    assert len(text.encode()) < 15_000
    command = 'pip install torch==2.13.0 -c constraints.txt -e ".[test]" && python -m pytest -q'
    assert command in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (README.parent / link).is_file(), link
