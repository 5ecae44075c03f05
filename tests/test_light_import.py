"""``import jlora`` loads the library only: no models, runner, Flax, tokenizers or orbax.

The library's own dependencies (pyproject's ``dependencies``) are all ``import jlora`` may load;
the cli extra's packages and orbax (imported when a checkpoint is touched) must not be.
Each check runs in a fresh interpreter, since this process has imported everything.
"""

import os
import re
import subprocess
import sys
import tomllib

import pytest
from bench_helpers import load_benchmark

from jlora._entry import CLI_EXTRA

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
measure = load_benchmark("import_time").measure

# Top-level modules `import jlora` must not load: the cli extra's, orbax, torch.
FORBIDDEN = {
    "flax",
    "tokenizers",
    "jinja2",
    "gguf",
    "orbax",
    "yaml",
    "matplotlib",
    "tensorboardX",
    "tqdm",
    "sentencepiece",
    "torch",
}


def fresh(code):
    """Runs ``code`` in a new interpreter; its stdout's last line."""
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    return got.stdout.strip().splitlines()[-1]


def test_import_jlora_loads_neither_the_cli_extra_nor_models_nor_runner(capsys):
    run = measure()
    modules = set(run["modules"])
    loaded = FORBIDDEN & {m.split(".")[0] for m in modules}
    assert not loaded, f"import jlora loaded {sorted(loaded)}"
    app = sorted(
        m for m in modules if m.split(".")[:2] in (["jlora", "models"], ["jlora", "runner"])
    )
    assert not app, f"import jlora loaded {app}"
    assert "jlora.cli" not in modules
    with capsys.disabled():  # no assertion on time: the machine may be loaded
        print(
            f"\nimport jax, optax {run['jax_optax_s']:.2f} s; import jlora after them "
            f"{run['jlora_s']:.2f} s (ratio {run['jlora_s'] / run['jax_optax_s']:.2f})"
        )


def test_checkpoints_load_orbax_on_first_use():
    code = (
        "import sys, tempfile, jlora\n"
        "names = {'save_checkpoint', 'restore_checkpoint', 'checkpoint_steps', 'Restored'}\n"
        "assert names <= set(jlora.__all__) and names <= set(dir(jlora))\n"
        "assert 'orbax' not in sys.modules\n"
        "assert jlora.checkpoint_steps(tempfile.mkdtemp()) == []\n"
        "print('orbax' in sys.modules)"
    )
    assert fresh(code) == "True"


def test_moved_peft_mappings_keep_their_old_names():
    import jlora.models.bert
    import jlora.models.decoder

    assert jlora.peft.HF_DECODER is jlora.models.decoder.PEFT_MAPPING
    assert jlora.peft.BUILTIN_BERT is jlora.models.bert.PEFT_MAPPING
    with pytest.raises(
        AttributeError, match=re.escape("'jlora.peft' has no attribute 'BUILTIN_LLAMA'")
    ):
        jlora.peft.BUILTIN_LLAMA  # noqa: B018


def test_old_peft_names_load_the_model_only_when_used():
    code = (
        "import sys, jlora\n"
        "assert 'jlora.models.decoder' not in sys.modules\n"
        "print(jlora.peft.HF_DECODER.name, 'jlora.models.decoder' in sys.modules)"
    )
    assert fresh(code) == "hf-decoder True"


def test_the_command_names_the_cli_extra_when_it_is_missing():
    code = (
        "import sys\nsys.modules['yaml'] = None\nfrom jlora._entry import main\nmain(['summary'])"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert got.returncode == 1, got.stderr[-2000:]
    assert got.stderr.strip() == (
        'jlora: the command needs the cli extra: pip install "jlora[cli]" (missing: pyyaml)'
    )


def test_the_command_lists_every_missing_package_of_the_cli_extra():
    code = (
        "import sys\nsys.modules['flax'] = sys.modules['google.protobuf'] = None\n"
        "from jlora._entry import main\nmain(['summary'])"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert got.returncode == 1, got.stderr[-2000:]
    assert got.stderr.strip().endswith("(missing: flax, protobuf)")


def test_the_command_checks_the_packages_of_the_cli_extra_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]
    names = {
        re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower()
        for spec in extras["optional-dependencies"]["cli"]
    }
    assert names == {package.lower() for package in CLI_EXTRA.values()}
