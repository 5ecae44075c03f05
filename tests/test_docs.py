"""The README and the documentation site: size, set-up lines, links, generated blocks, snippets
that run as written, and the strict build."""

import difflib
import importlib.util
import json
import os
import pathlib
import re
import shlex
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


def _generate():
    """docs/generate.py as a module (docs/ is not a package)."""
    name = "jlora_docs_generate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DOCS / "generate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


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
    # Line 1: a fresh venv, the cli extra (what the main job needs), then the main job.
    assert first.startswith("python3 -m venv .venv && . .venv/bin/activate")
    assert 'pip install -e ".[cli]"' in first
    assert first.endswith("jlora finetune")
    # Line 2: the PEFT extra, then the test suite.
    assert 'pip install -e ".[test,peft,wandb]"' in second
    assert second.endswith("python -m pytest")


def _pip_installs(text: str) -> list[tuple[str, ...]]:
    """The arguments of every ``pip install`` in shell text, less quietness and constraints."""
    installs = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0]
        for command in re.split(r"&&|;", line):
            if not command.strip().startswith("pip install "):
                continue
            words = shlex.split(command)
            args, skip = [], False
            for word in words[2:]:
                if skip:
                    skip = False
                elif word == "-c":
                    skip = True  # -c FILE: CI's lowest-version constraints
                elif word not in ("-q", "--upgrade", "--upgrade-strategy", "eager"):
                    args.append(word)
            installs.append(tuple(args))
    return installs


def test_ci_installs_what_the_readme_installs():
    readme = _pip_installs("\n".join(_generate().setup_commands()))
    ci = _pip_installs((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    assert ("-e", ".[cli]") in readme, "README's set-up lines install nothing recognisable"
    missing = [args for args in readme if args not in ci]
    assert not missing, f".ci/run does not install what README's set-up lines do: {missing}"


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


def test_generated_blocks_are_current():
    # Tables, lists and numbers in README.md and docs/ come from one source each (the code, the
    # nav, benchmarks/results/cpu.json, docs/outputs/); docs/generate.py writes them in place.
    stale = _generate().stale()
    diffs = []
    for path, fresh in stale.items():
        old = path.read_text(encoding="utf-8").splitlines()
        rel = str(path.relative_to(ROOT))
        diffs += list(difflib.unified_diff(old, fresh.splitlines(), rel, rel, lineterm="", n=1))
    assert not stale, (
        f"generated blocks are stale in {[str(p.relative_to(ROOT)) for p in stale]}; "
        "run: python docs/generate.py\n" + "\n".join(diffs[:60])
    )


def test_generated_block_markers_are_checked():
    generate = _generate()
    page = DOCS / "page.md"
    with pytest.raises(ValueError, match="unknown generated block 'config-kyes'"):
        generate.blocks(page, "<!-- generated: config-kyes -->\n<!-- end generated -->\n")
    with pytest.raises(ValueError, match="has no '<!-- end generated -->' line"):
        generate.blocks(page, "<!-- generated: cli -->\ntext\n")
    with pytest.raises(ValueError, match="starts inside the one opened at line 1"):
        generate.blocks(page, "<!-- generated: cli -->\n<!-- generated: cli -->\n")
    with pytest.raises(ValueError, match="without a start marker"):
        generate.blocks(page, "text\n<!-- end generated -->\n")
    text = "a\n<!-- generated: install -->\nold\n<!-- end generated -->\nb\n"
    fresh = generate.regenerate(page, text)
    assert fresh.startswith("a\n<!-- generated: install -->\n\n```bash\npython3 -m venv")
    assert fresh.endswith("```\n\n<!-- end generated -->\nb\n")


@pytest.mark.parametrize("path", sorted((DOCS / "api").glob("*.md")), ids=lambda p: p.name)
def test_api_pages_say_what_they_hold_without_the_site(path):
    # On GitHub the ::: lines render as text: a generated list of the names says what is there.
    text = path.read_text(encoding="utf-8")
    assert "<!-- generated: api-summary -->" in text
    assert text.index("<!-- generated: api-summary -->") < text.index("\n::: ")


PY_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
FRAGMENT = "<!-- fragment -->"
FRAGMENT_OF = re.compile(r"Fragment of \[[^\]]*\]\(([^)\s]+)\)")


def _python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, source)`` of each ```python block; ``source`` is set for a fragment.

    A fragment is a block right after a ``<!-- fragment -->`` line, with "Fragment of
    [file](link)" in the lines above that mark; its source is that link ("" when missing).
    """
    found = []
    for match in PY_BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        above = text[: match.start()].rstrip("\n").splitlines()
        source = None
        if above and above[-1].strip() == FRAGMENT:
            named = FRAGMENT_OF.search("\n".join(above[-6:-1]))
            source = named.group(1) if named else ""
        found.append((line, match.group(1), source))
    return found


def _code_lines(code: str) -> list[str]:
    lines = [line.split("  #", 1)[0].strip() for line in code.splitlines()]
    return [line for line in lines if line and line != "..." and not line.startswith("#")]


def _fragment_problems(path: pathlib.Path, text: str) -> list[str]:
    problems = []
    for line, code, source in _python_blocks(text):
        if source is None:
            continue
        where = f"{path.name}:{line}"
        target = (path.parent / source).resolve() if source else None
        if target is None or not target.is_file():
            problems.append(f"{where}: a fragment needs 'Fragment of [file](link)' to a file")
            continue
        have = set(_code_lines(target.read_text(encoding="utf-8")))
        problems += [
            f"{where}: {c!r} is not in {source}" for c in _code_lines(code) if c not in have
        ]
    return problems


def test_fragment_check_reads_the_marks():
    page = ROOT / "page.md"  # links resolve from the repository root
    ok = (
        "Fragment of [examples/jax_mlp.py](examples/jax_mlp.py):\n\n<!-- fragment -->\n"
        "```python\np = jlora.init_lora(kl, params, cfg)\n...\n```\n"
    )
    assert [source for _, _, source in _python_blocks(ok)] == ["examples/jax_mlp.py"]
    assert _fragment_problems(page, ok) == []
    changed = ok.replace("init_lora(kl", "init_lora(key")
    assert _fragment_problems(page, changed) == [
        "page.md:4: 'p = jlora.init_lora(key, params, cfg)' is not in examples/jax_mlp.py"
    ]
    unnamed = "<!-- fragment -->\n```python\nx = 1\n```\n"
    assert "needs 'Fragment of [file](link)'" in _fragment_problems(page, unnamed)[0]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_fragments_come_from_the_file_they_link(path):
    assert not _fragment_problems(path, path.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "path", [README, DOCS / "index.md", DOCS / "getting_started.md"], ids=lambda p: p.name
)
def test_python_blocks_run_as_written(path):
    # Each ```python block that is not marked as a fragment runs, in page order, in one
    # namespace: what a reader gets by pasting them into one session.
    blocks = _python_blocks(path.read_text(encoding="utf-8"))
    runnable = [(line, code) for line, code, source in blocks if source is None]
    assert runnable, f"{path.name} has no runnable python block"
    namespace = {"__name__": f"docs_{path.stem}"}
    for line, code in runnable:
        exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)


def test_the_builtin_model_to_peft_path_stays_documented():
    # tests/test_cli_export_peft.py follows this path: jlora finetune -> jlora export-peft ->
    # AutoPeftModelForCausalLM, the built-in model's directory the base.
    text = (DOCS / "adapter_files.md").read_text(encoding="utf-8")
    assert "jlora export-peft runs/default" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("runs/default/peft")' in text
    tests = (ROOT / "tests" / "test_cli_export_peft.py").read_text(encoding="utf-8")
    assert "def test_the_default_run_serves_from_auto_peft_model(" in tests


# Names of the retired built-in Llama and of runner modules that moved: a page, the README or an
# example that still names one sends the reader to code that is not there.
RETIRED = re.compile(
    r"jlora\.models\.llama\b|llama_hf|BUILTIN_LLAMA|builtin_llama|llama_pydoc\.safetensors"
    r"|PretrainedLMTask|runner/lm\.py|layer_\\d\+/attn|jlora[./]runner[./](lm|pretrained_lm"
    r"|instruction_data|instructions|text|stdlib_text|stdlib_modules|loop|sinks|interrupt|lock"
    r"|resume)\b"
)


def _reader_files() -> list[pathlib.Path]:
    return [*_markdown_files(), *sorted((ROOT / "examples").glob("*.py"))]


@pytest.mark.parametrize("path", _reader_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_or_example_names_a_retired_module(path):
    found = [
        f"{path.relative_to(ROOT)}:{i}: {m.group(0)}"
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for m in RETIRED.finditer(line)
    ]
    assert not found, found


def test_the_retired_names_check_sees_them():
    # Guards the pattern: one that matches nothing would pass on anything.
    for stale in (
        "from jlora.models.llama import Llama",
        "jlora.peft.BUILTIN_LLAMA",
        "jlora/assets/llama_pydoc.safetensors",
        "jlora.runner.text.load_text",
        "jlora/runner/instruction_data.py",
        r'targets=r"layer_\d+/attn/(query|value)/kernel"',
    ):
        assert RETIRED.search(stale), stale
    for current in ("builtin:llama_pydoc", "jlora.runner.data.text", "jlora.runner.rundir"):
        assert not RETIRED.search(current), current


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        target = next(iter(item.values())) if isinstance(item, dict) else item
        pages += [target] if isinstance(target, str) else _nav_pages(target)
    return pages


def test_every_page_says_what_it_needs_installed():
    # One line at the top of each page, written from mkdocs.yml's extra.page_needs.
    pages = _nav_pages(_generate()._mkdocs_config()["nav"])
    assert "architecture.md" in pages and len(pages) > 20
    missing = []
    for page in pages:
        head = (DOCS / page).read_text(encoding="utf-8").splitlines()[:3]
        if head[1:] != ["", "<!-- generated: needs -->"]:
            missing.append(page)
    assert not missing, f"no '<!-- generated: needs -->' block under the title of {missing}"


def test_imports_go_one_way_as_the_architecture_page_says():
    # cli -> runner -> models -> library; nothing imports the other way.
    order = {"library": 0, "jlora.models": 1, "jlora.cli": 3, "jlora._entry": 4}
    edges = _generate().import_edges()
    rank = {p: order.get(p, 2) for p in {*edges, *(b for bs in edges.values() for b in bs)}}
    upward = sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs if rank[b] > rank[a])
    assert not upward, upward
    assert edges["jlora.models"] == {"library"}


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


# docs/your_model.md: each ```bash block right after a "<!-- tested -->" line runs as written,
# in page order, in a directory holding what the page's commands name: a tiny random Llama
# checkpoint as my-model/, chats as chats.jsonl and the page's YAML as my-run.yaml.
YOUR_MODEL = DOCS / "your_model.md"
TESTED = "<!-- tested -->"
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```$", re.MULTILINE | re.DOTALL)
YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# Appended to a training `jlora finetune` (not a --dry-run): two steps instead of the auto
# value's 100, so the page's run takes seconds; nothing else in the commands changes.
TINY_RUN = ["train.steps=2", "train.eval_batches=1", "generate.max_new_tokens=2"]
# A chat template whose rendering of a conversation's start is a prefix of the whole, as real
# models' templates are (runner_helpers.CHAT is not: it marks no turn's role).
ROLE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)


def _tested_commands(text: str) -> list[tuple[int, str]]:
    """``(line, command)`` of each line of the ```bash blocks marked ``<!-- tested -->``."""
    found = []
    for match in BASH_BLOCK.finditer(text):
        above = text[: match.start()].rstrip("\n").splitlines()
        if not above or above[-1].strip() != TESTED:
            continue
        first = text.count("\n", 0, match.start()) + 2
        for i, line in enumerate(match.group(1).splitlines()):
            if line.strip():
                found.append((first + i, line.strip()))
    return found


def test_tested_commands_read_the_marks():
    text = "```bash\nhf download x\n```\n\n<!-- tested -->\n```bash\njlora a\n\njlora b\n```\n"
    assert _tested_commands(text) == [(7, "jlora a"), (9, "jlora b")]


@pytest.fixture(scope="module")
def your_model_run(tmp_path_factory):
    """The page's tested commands run in a fresh directory: ``(directory, [(command, run)])``."""
    pytest.importorskip("tokenizers")
    from runner_helpers import write_checkpoint  # tests/ is on sys.path (rootdir-relative)

    cwd = tmp_path_factory.mktemp("your_model")
    (cwd / "my-model").mkdir()
    write_checkpoint(cwd / "my-model", chat_template=ROLE_TEMPLATE)
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(30)
    ]
    (cwd / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    text = YOUR_MODEL.read_text(encoding="utf-8")
    (yaml,) = YAML_BLOCK.findall(text)
    assert "Save this as `my-run.yaml`" in text
    (cwd / "my-run.yaml").write_text(yaml)
    runs = []
    for line, command in _tested_commands(text):
        words = shlex.split(command)
        assert words[0] == "jlora", f"your_model.md:{line}: a tested command runs jlora"
        if words[1] == "finetune" and "--dry-run" not in words:
            words += TINY_RUN
        run = subprocess.run(
            [sys.executable, "-m", "jlora.cli", *words[1:]],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, f"your_model.md:{line}: {command}\n{run.stdout}{run.stderr}"
        runs.append((command, run.stdout + run.stderr))
    return cwd, runs


def test_your_model_page_runs_as_written(your_model_run):
    cwd, runs = your_model_run
    commands = [command for command, _ in runs]
    assert commands == [
        "jlora finetune model.path=my-model data.train=chats.jsonl --dry-run",
        "jlora finetune model.path=my-model data.train=chats.jsonl",
        "jlora finetune my-run.yaml --dry-run",
        "jlora finetune model.path=my-model data.train=chats.jsonl train.learning_rate=1e-4",
        'jlora generate runs/my-model-chats "What is 2 plus 2?" --chat',
        "jlora merge runs/my-model-chats --format hf",
        "jlora export-peft runs/my-model-chats",
    ]
    dry_run = runs[0][1]
    for part in ("== config: auto values resolved", "== data", "== memory =="):
        assert part in dry_run
    # The auto values the page's table describes, for the tiny checkpoint and data.
    assert "run_dir runs/my-model-chats: named after the model and data" in dry_run
    assert "data.seq_len 64: the 95th percentile" in dry_run
    assert "train.learning_rate 0.0002" in dry_run
    assert "train.batch_size 8" in dry_run
    assert "raised to the minimum of 100" in dry_run
    assert "held in float32" in dry_run
    run = cwd / "runs" / "my-model-chats"
    assert "== what LoRA did (runs/my-model-chats) ==" in runs[1][1]
    assert (run / "adapter").is_dir()
    assert "learning_rate: 0.0001" in (run / "config.yaml").read_text()
    assert runs[4][1].strip(), "jlora generate printed no answer"
    assert (run / "merged_hf" / "config.json").is_file()
    assert (run / "peft" / "adapter_config.json").is_file()


@pytest.mark.peft
def test_your_model_result_loads_in_transformers_and_peft(your_model_run, monkeypatch):
    # The page's python blocks, in one namespace, in the directory its commands ran in.
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    cwd, _ = your_model_run
    monkeypatch.chdir(cwd)
    blocks = _python_blocks(YOUR_MODEL.read_text(encoding="utf-8"))
    assert len(blocks) == 2 and all(source is None for _, _, source in blocks)
    namespace = {"__name__": "docs_your_model"}
    for line, code, _ in blocks:
        exec(compile(code, f"docs/your_model.md:{line}", "exec"), namespace)
    assert namespace["model"].peft_config
