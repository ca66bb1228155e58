"""The README's Python snippet runs as written (docs that drift are bugs)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run():
    snippets = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert snippets, "README lost its Python example"
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), {})


def test_readme_quickstart_has_the_two_commands():
    text = README.read_text()
    commands = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert any("examples/train_tokenizer.py" in c for c in commands)
    # .ci/run runs the line after the marker verbatim: the lint and the tests
    test_command = re.search(r"<!-- test-command -->\n```bash\n(.*)\n```", text)
    assert test_command, "README lost its test command"
    assert "ruff check ." in test_command.group(1) and "pytest" in test_command.group(1)
