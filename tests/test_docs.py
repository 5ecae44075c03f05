"""The README and the documentation site: size, set-up lines, links, and the strict build."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# [text](target) outside code; images too. Absolute URLs and pure anchors are not files.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _relative_links(path: pathlib.Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    links = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        links.append(target)
    return links


def _markdown_files() -> list[pathlib.Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def test_readme_is_at_most_8000_characters():
    size = len(README.read_text(encoding="utf-8"))
    assert size <= 8000, f"README.md is {size} characters; move depth into docs/ (limit 8000)"


def test_readme_starts_with_the_two_set_up_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# jlora"
    start = lines.index("```bash")
    assert start <= 3, f"the set-up commands must open the README; found ```bash at line {start}"
    first, second, close = lines[start + 1 : start + 4]
    assert close == "```", "exactly two set-up command lines"
    # Line 1: a fresh venv, the test extra as CI installs it, then the main job.
    assert first.startswith("python3 -m venv .venv && . .venv/bin/activate")
    assert 'pip install -e ".[test]"' in first
    assert first.endswith("jlora finetune")
    # Line 2: the PEFT extra, then the test suite.
    assert 'pip install -e ".[test,peft,wandb]"' in second
    assert second.endswith("python -m pytest")
    # .ci/run installs the same extras.
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert '-e ".[test]"' in ci and '-e ".[test,peft,wandb]"' in ci


def test_readme_keeps_the_instruction_fine_tuning_section():
    assert "\n## Instruction fine-tuning\n" in README.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(path):
    missing = []
    for target in _relative_links(path):
        file = target.split("#", 1)[0]
        if file and not (path.parent / file).exists():
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


def test_link_check_sees_links():
    # Guards the regex: a checker that finds no link would pass on anything.
    assert "docs/getting_started.md" in _relative_links(README)


def test_the_builtin_llama_to_peft_path_stays_documented():
    # tests/test_peft_llama_builtin.py follows this path: runner adapter/ -> PEFT -> PeftModel.
    text = (DOCS / "adapter_files.md").read_text(encoding="utf-8")
    assert 'jlora.load_adapter("runs/default/adapter", base)' in text
    assert "jlora.peft.BUILTIN_LLAMA" in text and "PeftModel.from_pretrained" in text


def test_mkdocs_build_strict():
    # The site's strict build (warnings fail): a few seconds alone, but it imports jax and
    # jlora, so on a loaded 2-core machine it is given minutes before it counts as hung.
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("material")
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is importable but its command is not on PATH")
    with tempfile.TemporaryDirectory() as site:
        run = subprocess.run(
            [mkdocs, "build", "--strict", "--site-dir", site],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert (pathlib.Path(site) / "index.html").exists()
