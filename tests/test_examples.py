"""Every example runs, on tiny settings, and shows LoRA doing its job."""

import os
import re
import runpy

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def example(name):
    return runpy.run_path(os.path.join(EXAMPLES, f"{name}.py"), run_name="example")["main"]


def test_linen_finetune():
    r = example("linen_finetune")(steps=30)
    assert r["after"] < r["before"]


def test_nnx_finetune():
    r = example("nnx_finetune")(steps=30)
    assert r["after"] < r["before"]


def test_jax_mlp():
    r = example("jax_mlp")(steps=30)
    assert r["after"] < r["before"] and r["unchanged"]


def test_merge_export(tmp_path):
    r = example("merge_export")(steps=2, out=str(tmp_path))
    assert r["gap"] < 1e-3
    assert (tmp_path / "merged_hf" / "config.json").is_file()  # a Hugging Face directory
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_lora_article_1000x10000_rank_10():
    r = example("lora_article")(steps=3)
    assert r["trainable"] == 110_000  # 1000*10 + 10*10000: 1.1% of 10M
    assert r["last"] < r["first"]


def test_qlora_scan():
    r = example("qlora_scan")(steps=20)
    assert r["after"] < r["before"] and r["gap"] < 1e-3
    assert r["nf4"] < r["float"] - 5  # the base's 8 MB of float kernels held in 4.5 bits


NAMES = sorted(f.removesuffix(".py") for f in os.listdir(EXAMPLES) if f.endswith(".py"))


@pytest.mark.parametrize("name", NAMES)
def test_examples_document_how_to_run(name):
    with open(os.path.join(EXAMPLES, f"{name}.py")) as f:
        assert f"python examples/{name}.py" in f.read()  # "Run: ..." or a command per setting


@pytest.mark.parametrize("name", NAMES)
def test_every_example_is_listed_and_run(name):
    # docs/examples.md links each one; this file (or, for the multi-process one,
    # test_distributed.py) runs it.
    tests = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(os.path.dirname(EXAMPLES), "docs", "examples.md")) as f:
        assert f"](../examples/{name}.py)" in f.read(), f"docs/examples.md does not link {name}.py"
    runners = []
    for test_file in ("test_examples.py", "test_distributed.py"):
        with open(os.path.join(tests, test_file)) as f:
            if re.search(rf"example\(\"{name}\"\)|\"{name}\.py\"", f.read()):
                runners.append(test_file)
    assert runners, f"no test runs examples/{name}.py"
