"""Strict settings for the whole suite: highest matmul precision, one tolerance table."""

import jax
import jax.numpy as jnp
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# Relative tolerances per dtype, for comparisons where the maths is exact but rounding is not.
TOLERANCE = {jnp.dtype("float32"): 1e-5, jnp.dtype("bfloat16"): 2e-2, jnp.dtype("float16"): 2e-3}


@pytest.fixture(params=["eager", "jit"])
def maybe_jit(request):
    """Runs a function as is or under ``jax.jit`` (static config arguments allowed)."""
    if request.param == "eager":
        return lambda fn, **kw: fn
    return lambda fn, **kw: jax.jit(fn, **kw)


@pytest.fixture(autouse=True)
def _keep_the_suites_allocator(monkeypatch):
    """In-process ``jlora finetune`` calls leave this process's malloc settings alone.

    ``keep_freed_memory`` is process-wide; its own tests and the CLI runs in subprocesses
    exercise it for real.
    """
    import jlora.cli

    monkeypatch.setattr(jlora.cli, "keep_freed_memory", lambda: False)


# The application's end-to-end tests (runs of the command, benchmarks, docs): CI's newest-JAX
# job leaves them to the first job, keeping one runner file, so both jobs fit CI's time.
_APPLICATION = (
    "runner/",
    "test_runner_",
    "test_benchmarks_",
    "test_docs",
    "test_examples",
    "test_cli",
)
_KEPT_IN_BOTH = ("runner/test_finetune.py",)


# The slowest end-to-end tests (half a minute to a minute and a half each on 2 CPU cores):
# `python -m pytest -m slow` runs them; the default run and CI leave them out to keep CI
# within its time. Each covers a path that faster tests also reach.
_SLOW = (
    "runner/test_mesh.py::test_sharded_run_matches_single_device",
    "test_docs.py::test_your_model_page_runs_as_written",
    "test_runner_preference.py::test_smollm2_dpo_config_runs_one_step",
    "runner/test_causal_lm.py::test_smollm2_instruction_config_runs_one_step",
    "models/test_pretrained.py::test_smollm2_reads_english_and_answers_in_words",
    "models/test_gemma.py::test_gemma3_270m_gguf_matches_transformers_gguf_loader",
    "test_runner_preference.py::test_a_preference_run_on_a_mesh_matches_one_device",
    "test_distributed.py::test_2x2x2_mesh_losses_equal_single_device",
    "test_dora.py::test_unchanged_at_init_and_merge_equals_factorised_with_grads",
    "test_runner_preference.py::test_accumulated_micro_batches_weigh_pairs",
    "runner/test_variants.py::test_dora_on_a_quantised_base_trains_resumes_and_serves",
    "test_benchmarks_instruction.py::test_every_table_on_a_tiny_checkpoint",
    "test_runner_grpo.py::test_held_out_reward_rises_on_a_learnable_reward",
    "test_runner_grpo.py::test_smollm2_grpo_config_runs_one_step",
    "test_runner_grpo.py::test_a_grpo_run_on_a_mesh_samples_and_trains_as_on_one_device",
    "runner/test_instruction_runs.py::test_a_memorised_answer_scores_exact_match_one",
    # issue 24's heaviest checks: attend-level tests cover every mask case in the default run,
    # and the benchmark smoke tests' paths are covered by their lighter siblings
    "test_benchmarks_llama.py::test_every_path_runs_or_is_reported",
    "test_benchmarks_plan.py::test_the_planner_benchmark_checks_a_run_and_plans_llama",
    "test_benchmarks_long_loss.py::test_the_chunked_loss_holds_less_than_the_full_logits",
    "models/test_attention.py::test_decoder_logits_and_grads_match_einsum[gemma3]",
    "models/test_attention.py::test_decoder_logits_and_grads_match_einsum[llama-gqa]",
    "models/test_attention.py::test_decoder_logits_and_grads_match_einsum[mistral-window]",
)


def pytest_collection_modifyitems(config, items):
    """Marks ``application`` (see ``_APPLICATION``) and ``slow`` (see ``_SLOW``) tests."""
    del config
    for item in items:
        where = item.nodeid.split("tests/", 1)[-1]
        if where.startswith(_APPLICATION) and not where.startswith(_KEPT_IN_BOTH):
            item.add_marker(pytest.mark.application)
        if where.startswith(_SLOW):
            item.add_marker(pytest.mark.slow)
