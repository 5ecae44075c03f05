"""The runner on prompts and rewards: train.objective=grpo, rewards, rollouts, resume."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from runner_helpers import DEFAULT, run_on_devices, write_checkpoint

import jlora
from jlora.runner.config import load_config
from jlora.runner.data.prompts import read_prompts
from jlora.runner.finetune import finetune
from jlora.runner.objectives.grpo import GRPO
from jlora.runner.rewards import load_reward, load_rewards, score
from jlora.runner.rundir.directory import read_metrics
from jlora.runner.tasks import lora_config
from jlora.runner.tasks.rl import RLTask, Rollout, adapted_step

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)
PROMPTS = [
    {"prompt": "the sum of two and two is", "answer": "four"},
    {"prompt": "a colour of the sky:", "answer": "blue"},
    {"prompt": [{"role": "user", "content": "the opposite of night"}], "answer": "day"},
    {"prompt": "a season:", "answer": "summer"},
    {"prompt": "the rose is", "answer": "sweet"},
    {"prompt": "thou art more lovely and", "answer": "temperate"},
]
# A reward with spread from the first step: the share of vowels in the completion.
VOWELS = """
def vowels(prompts, completions, **columns):
    assert len(prompts) == len(completions) == len(columns["answer"])
    text = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in text]
"""


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "chat", chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    (root / "rewards.py").write_text(VOWELS)
    return (
        write_jsonl(root / "train.jsonl", PROMPTS),
        write_jsonl(root / "eval.jsonl", PROMPTS[:3]),
        root / "rewards.py",
    )


def overrides(run_dir, checkpoint, data, steps=4, **extra):
    kv = {
        "run_dir": run_dir,
        "model.path": checkpoint,
        "data.train": data[0],
        "data.eval": data[1],
        "data.seq_len": 32,
        "train.objective": "grpo",
        "train.rewards": f"['{data[2]}:vowels', 'exact_match:answer']",
        "train.num_generations": 4,
        "train.max_new_tokens": 8,
        "train.steps": steps,
        "train.warmup_steps": 0,
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
    ("extra", "match"),
    [
        ({"train.rewards": "[]"}, r"train.objective=grpo needs train.rewards"),
        ({"train.reward_weights": "[1.0]"}, r"has 1 weight\(s\) for 2 reward function\(s\)"),
        ({"train.grad_accum": 2}, r"train.grad_accum=2: train.objective=grpo updates on each"),
        ({"train.epsilon_high": 0.1}, r"train.epsilon_high: must be a finite number >= "),
        ({"train.top_k": 0}, r"train.top_k: must be >= 1 or null, found 0"),
        ({"train.top_p": 1.5}, r"train.top_p: must be in \(0, 1\] or null, found 1.5"),
        ({"train.num_generations": 1}, r"train.num_generations: must be >= 2, found 1"),
        ({"train.temperature": 0}, r"train.temperature: must be a finite number > 0"),
        ({"train.loss_type": "ppo"}, r"train.loss_type: expected one of \('grpo', 'bnpo'"),
        ({"train.scale_rewards": "max"}, r"train.scale_rewards: expected one of \('group'"),
    ],
)
def test_grpo_keys_are_validated(checkpoint, data, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        load_config(DEFAULT, overrides(tmp_path / "r", checkpoint, data, **extra))


def test_rewards_belong_to_grpo_and_grpo_needs_prompts():
    with pytest.raises(ValueError, match=r"train.rewards is used by train.objective=grpo only"):
        load_config(DEFAULT, ["train.rewards=['exact_match:answer']"])
    over = ["train.objective=grpo", "train.rewards=['exact_match:answer']"]
    with pytest.raises(ValueError, match=r"train.objective='grpo' trains a decoder .* prompts"):
        load_config(DEFAULT, over)


def test_grpo_refuses_the_merge_step(checkpoint, data, tmp_path):
    config = load_config(DEFAULT, overrides(tmp_path / "r", checkpoint, data))
    import dataclasses

    merged = dataclasses.replace(
        config, train=dataclasses.replace(config.train, train_step="merge")
    )
    with pytest.raises(ValueError, match=r"runs with train.train_step=factorised"):
        GRPO(RLTask(config), lora_config(config), merged)


# --- rewards --------------------------------------------------------------------------------


def test_builtin_rewards():
    rows = ["q"] * 4
    columns = {"answer": ["json", "json", "os.path", "os"]}
    completions = [" json ", "It is json.", "os.path", "os.path"]
    assert load_reward("exact_match:answer")(rows, completions, **columns) == [1, 0, 1, 0]
    assert load_reward("contains:answer")(rows, completions, **columns) == [1, 1, 1, 0]
    assert load_reward(r"regex:^\s*[a-z.]+\s*$")(rows, completions) == [1, 0, 1, 1]
    chat = [[{"role": "assistant", "content": "json"}]]
    assert load_reward("exact_match:answer")(["q"], chat, answer=["json"]) == [1.0]
    numbers = ["7 + 5 = 12.", "12 + 1", "It is 1,200.", "-3", "none"]
    want = {"answer": ["12", "12", "1200", -3, "0"]}
    assert load_reward("last_number:answer")(["q"] * 5, numbers, **want) == [1, 0, 1, 1, 0]


def test_last_number_needs_a_number_to_compare_with():
    with pytest.raises(ValueError, match=r"last_number:answer: row 1's answer 'json' holds no"):
        load_reward("last_number:answer")(["q", "q"], ["1", "2"], answer=["1", "json"])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nothing", r"reward 'nothing': name a function as path/to/file.py:name or module:name"),
        ("missing.py:f", r"reward 'missing.py:f': missing.py does not exist"),
        ("no_such_module_x:f", r"module 'no_such_module_x' does not import"),
        ("os.path:nope", r"reward 'os.path:nope': os.path has no function 'nope'"),
        ("os:sep", r"os has no function 'sep' \(sep is a str\)"),
        ("regex:(", r"reward regex:\(: not a regular expression"),
        ("exact_match:", r"reward 'exact_match:': exact_match needs an argument"),
    ],
)
def test_bad_reward_names_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        load_reward(spec)


def test_a_reward_file_that_fails_to_load_is_named(tmp_path):
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match=r"bad.py failed to load: RuntimeError\('boom'\)"):
        load_reward(f"{tmp_path / 'bad.py'}:f")


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda p, c, **k: 1 / 0, r"reward 'bad' raised ZeroDivisionError"),
        (lambda p, c, **k: [1.0], r"reward 'bad' returned 1 value\(s\) for 2 completion\(s\)"),
        (lambda p, c, **k: 3.0, r"reward 'bad' returned a float for 2 completion"),
        (lambda p, c, **k: [1.0, float("nan")], r"returned nan for completion 1 .*must be fin"),
        (lambda p, c, **k: [1.0, "x"], r"returned 'x' for completion 1; rewards are numbers"),
    ],
)
def test_a_bad_reward_is_one_error_naming_it(fn, match):
    rewards = [load_rewards(["exact_match:answer"])[0].__class__("bad", 1.0, fn)]
    with pytest.raises(ValueError, match=match):
        score(rewards, ["q", "q"], ["a", "b"], {})


def test_a_missing_column_is_named():
    rewards = load_rewards(["exact_match:answer"])
    with pytest.raises(ValueError, match=r"no column 'answer' \(they have \['label'\]\)"):
        score(rewards, ["q"], ["a"], {"label": ["a"]})


def test_none_leaves_a_row_out_of_the_sum_as_trl_does():
    rewards = load_rewards(["exact_match:answer", "regex:^a$"], [2.0, 1.0])
    rewards[1] = rewards[1].__class__("none", 1.0, lambda p, c, **k: [None, None])
    per, total = score(rewards, ["q", "q"], ["a", "b"], {"answer": ["a", "a"]})
    assert np.isnan(per[1]).all() and total.tolist() == [2.0, 0.0]


# --- data -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["stdlib_modules", "arithmetic"])
def test_shipped_prompts_rebuild_identically_from_their_script(name, tmp_path):
    from jlora.runner.data import arithmetic_prompts, stdlib_prompts
    from jlora.runner.data.chat_batches import resolve_data

    script = {"stdlib_modules": stdlib_prompts, "arithmetic": arithmetic_prompts}[name]
    script.main([str(tmp_path)])
    for file in ("train.jsonl", "eval.jsonl"):
        shipped = resolve_data(f"builtin:{name}/{file}", "data.train", "prompts")
        with open(shipped, encoding="utf-8") as f:
            assert (tmp_path / file).read_text(encoding="utf-8") == f.read()
    train, held = (read_prompts(tmp_path / f) for f in ("train.jsonl", "eval.jsonl"))
    seen = {json.dumps(p) for p in train.prompts}
    assert not any(json.dumps(p) in seen for p in held.prompts)  # held out means held out


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"question": "x"}', r'p.jsonl:2: a record is a JSON object with a "prompt"'),
        ('{"prompt": " "}', r'p.jsonl:2: "prompt" is empty'),
        ('{"prompt": 3}', r'p.jsonl:2: "prompt" must be a string or a non-empty list'),
        ('{"prompt": [{"role": "bot", "content": "x"}]}', r"message 0 has role 'bot'"),
        ("not json", r"p.jsonl:2: malformed JSON"),
    ],
)
def test_bad_prompts_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(PROMPTS[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match):
        read_prompts(path)


# --- rollouts and runs ----------------------------------------------------------------------


def test_rollout_rows_mark_the_completion_and_sample_like_a_merged_model(
    checkpoint, data, tmp_path
):
    config = load_config(DEFAULT, overrides(tmp_path / "r", checkpoint, data))
    task, cfg = RLTask(config), lora_config(config)
    params = jlora.init_lora(jax.random.key(0), task.base, cfg)
    params = jax.tree.map_with_path(
        lambda p, x: x + 0.05 if jlora.path_str(p).endswith("_lora_b") else x, params
    )
    key = jax.random.key(7)
    live = task.rollout(adapted_step(task, cfg), params, np.array([0, 2]), key)
    merged = task.rollout(task._step, jlora.merge_params(params, cfg), np.array([0, 2]), key)
    np.testing.assert_array_equal(live.batch["tokens"], merged.batch["tokens"])
    assert live.texts == merged.texts and len(live.texts) == 8
    b = live.batch
    for row in range(8):
        learned = np.flatnonzero(b["loss_mask"][row])
        assert len(learned) == live.lengths[row] >= 1
        # The learned targets are the completion: what follows the prompt, decoded.
        text = task.tokenizer.decode(b["targets"][row, learned].tolist(), skip_special_tokens=True)
        assert text == live.texts[row]
    assert b["tokens"].shape == (8, 32)


def test_grpo_run_logs_trl_metrics_and_reports_rewards(checkpoint, data, tmp_path):
    run_dir = tmp_path / "r"
    results = finetune(load_config(DEFAULT, overrides(run_dir, checkpoint, data)), log=print)
    metrics = read_metrics(run_dir)
    first = next(m for m in metrics if "train_loss" in m)
    want = {
        "train_reward",
        "train_reward_std",
        "train_kl",
        "train_clip_ratio/region_mean",
        "train_completions/mean_length",
        "train_frac_reward_zero_std",
        "train_rewards/vowels/mean",
        "train_rewards/exact_match:answer/mean",
        "train_time/sampling",
        "train_time/update",
    }
    assert want <= set(first), want - set(first)
    assert all(np.isfinite(m["train_loss"]) for m in metrics if "train_loss" in m)
    before, after = results["before"], results["after"]
    assert {"eval_reward", "eval_rewards/exact_match:answer"} <= set(before) & set(after)
    assert len(after["samples"]) == 1
    lines = (run_dir / "completions.jsonl").read_text().splitlines()
    assert {json.loads(line)["step"] for line in lines} == {0, 2, 4}


def test_resume_samples_and_trains_as_an_uninterrupted_run(checkpoint, data, tmp_path):
    def records(run_dir):
        keys = ("step", "train_loss", "train_reward", "train_completions/mean_length")
        return [[m[k] for k in keys] for m in read_metrics(run_dir) if "train_loss" in m]

    # Dynamic sampling's extra rounds must draw the same prompts after a resume, too.
    extra = {"train.dynamic_sampling": "true"}
    whole = tmp_path / "whole"
    finetune(load_config(DEFAULT, overrides(whole, checkpoint, data, **extra)), log=lambda _: 0)
    part = tmp_path / "part"
    shutil.copytree(whole, part)  # then stopped after step 2: resumed from its checkpoint
    shutil.rmtree(part / "checkpoints" / "4")
    shutil.rmtree(part / "adapter")
    os.remove(part / "results.json")
    finetune(load_config(DEFAULT, overrides(part, checkpoint, data, **extra)), log=lambda _: 0)
    assert records(part) == records(whole)
    logged = [m for m in read_metrics(whole) if "train_loss" in m]
    assert all(0 <= m["train_sampling_rounds"] <= 3 for m in logged), logged
    # completions.jsonl is cut back to step 2 too: step 4's samples appear once, as whole's.
    completions = [read_metrics(d, "completions.jsonl") for d in (part, whole)]
    assert completions[0] == completions[1]


def test_held_out_reward_rises_on_a_learnable_reward(checkpoint, data, tmp_path):
    over = overrides(tmp_path / "r", checkpoint, data, steps=16, **{"train.eval_every": 100})
    over += [f"train.rewards=['{data[2]}:vowels']", "train.num_iterations=2"]
    over.append("train.learning_rate=0.05")
    results = finetune(load_config(DEFAULT, over), log=lambda _: 0)
    before, after = results["before"]["eval_reward"], results["after"]["eval_reward"]
    assert after > before + 0.3, (before, after)


@pytest.mark.parametrize(
    ("name", "data", "rewards"),
    [
        ("smollm2_stdlib_grpo", "stdlib_modules", ["exact_match:answer", "contains:answer"]),
        ("smollm2_arithmetic_grpo", "arithmetic", ["last_number:answer"]),
    ],
)
def test_smollm2_grpo_config_runs_one_step(name, data, rewards, tmp_path):
    from jlora.runner.data.chat_batches import resolve_data

    held = resolve_data(f"builtin:{data}/eval.jsonl", "data.eval", "prompts")
    with open(held, encoding="utf-8") as f:
        small = write_jsonl(tmp_path / "eval.jsonl", [json.loads(next(f)) for _ in range(2)])
    over = [
        f"run_dir={tmp_path / 'smol'}",
        f"data.eval={small}",
        "train.steps=1",
        "train.batch_size=1",
        "train.num_generations=2",
        "train.max_new_tokens=3",
        "train.checkpoint_every=1",
        "train.progress=false",
        "generate.max_new_tokens=2",
    ]
    results = finetune(load_config(name, over), log=lambda _: 0)
    names = {"eval_reward", *(f"eval_rewards/{r}" for r in rewards)}
    assert names <= set(results["before"]) & set(results["after"])
    (step,) = [m for m in read_metrics(tmp_path / "smol") if "train_loss" in m]
    assert step["train_completions/mean_length"] <= 3


def test_auto_keys_are_measured_on_the_prompts(checkpoint, data):
    logs = []
    over = [
        f"model.path={checkpoint}",
        f"data.train={data[0]}",
        "train.objective=grpo",
        "train.rewards=['exact_match:answer']",
        "train.max_new_tokens=40",
    ]
    config = load_config(DEFAULT, over, log=logs.append)
    assert config.data.seq_len == 64  # the longest prompt plus 40 new tokens, rounded up
    assert config.train.steps == 100  # 5 prompts, 8 a step: one epoch, raised to the minimum
    shown = "\n".join(logs)
    assert "training prompts (plus train.max_new_tokens)' token lengths" in shown
    assert "one epoch is 1 step(s) (5 prompts of 64 tokens, 8 a step)" in shown
    assert len(config.generate.prompts) == 1  # the held-out prompt, asked as in training


class _PromptTask:
    """Stands in for RLTask in dynamic sampling: prompt i's group differs iff i is odd."""

    def __init__(self, n):
        self.train_prompts = type("Prompts", (), {"prompts": list(range(n))})()
        self.calls = []

    def rollout(self, sampler, params, indices, key):
        del sampler, params, key
        self.calls.append([int(i) for i in indices])
        rows = [int(i) for i in indices for _ in range(2)]
        rewards = np.asarray([i % 2 * k for i in indices for k in (0.0, 1.0)])
        tokens = np.asarray([[i, i] for i in rows], np.int32)
        texts = [str(i) for i in rows]
        return Rollout({"tokens": tokens}, rewards, rewards[None], texts, np.ones(len(rows)))


def dynamic(task, rounds, batch_size=3):
    grpo = GRPO.__new__(GRPO)
    train = {
        "num_generations": 2,
        "batch_size": batch_size,
        "seed": 0,
        "dynamic_sampling_rounds": rounds,
    }
    grpo.task, grpo._sampler = task, None
    grpo.config = type("Config", (), {"train": type("Train", (), train)()})()
    return grpo


def test_dynamic_sampling_replaces_uniform_groups_with_new_prompts_of_the_same_step():
    task = _PromptTask(40)
    first = task.rollout(None, None, np.asarray([0, 1, 2]), None)  # one useful group of three
    filled, rounds = dynamic(task, rounds=5)._fill(first, None, jax.random.key(0), step=7)
    prompts = filled.batch["tokens"][::2, 0]
    assert prompts[0] == 1 and np.all(prompts % 2 == 1), prompts  # the step's own useful group
    assert filled.batch["tokens"].shape == (6, 2) and filled.rewards.shape == (6,)
    assert filled.per_function.shape == (1, 6) and len(filled.texts) == 6
    np.testing.assert_array_equal(filled.rewards, np.tile([0.0, 1.0], 3))
    assert 1 <= rounds <= 5 and len(task.calls) == 1 + rounds
    # A resumed run draws the same prompts at the same step; another step draws others.
    again = dynamic(_PromptTask(40), rounds=5)._fill(first, None, jax.random.key(0), step=7)
    np.testing.assert_array_equal(again[0].batch["tokens"], filled.batch["tokens"])
    other = _PromptTask(40)
    dynamic(other, rounds=5)._fill(first, None, jax.random.key(0), step=8)
    assert other.calls != task.calls[1:]


def test_dynamic_sampling_keeps_the_batch_size_when_its_rounds_run_out():
    task = _PromptTask(40)
    first = task.rollout(None, None, np.asarray([0, 2, 4]), None)  # nothing to learn from
    filled, rounds = dynamic(task, rounds=0)._fill(first, None, jax.random.key(0), step=1)
    assert rounds == 0 and len(task.calls) == 1
    np.testing.assert_array_equal(filled.batch["tokens"], first.batch["tokens"])
    only_even = _PromptTask(40)
    only_even.rollout = lambda s, p, i, k: first  # every round scores alike
    filled, rounds = dynamic(only_even, rounds=2)._fill(first, None, jax.random.key(0), step=1)
    assert rounds == 2 and filled.batch["tokens"].shape == (6, 2)


_MESH_RUN = """
import json, pathlib, sys
sys.path.insert(0, sys.argv[2])
import test_runner_grpo as t
from runner_helpers import DEFAULT, write_checkpoint
from jlora.runner.config import load_config
from jlora.runner.finetune import finetune
from jlora.runner.rundir.directory import read_metrics

root = pathlib.Path(sys.argv[1])
ck = write_checkpoint(root / "ck", chat_template=t.TEMPLATE)
(root / "rewards.py").write_text(t.VOWELS)
train = t.write_jsonl(root / "tr.jsonl", t.PROMPTS)
data = (train, t.write_jsonl(root / "ev.jsonl", t.PROMPTS[:3]), root / "rewards.py")
keys = ("train_loss", "train_reward", "train_kl", "train_completions/mean_length")
out = {}
for name, extra in (("one", {}), ("mesh", {"mesh.data": 2, "mesh.tensor": 2})):
    over = t.overrides(root / name, ck, data, steps=2, **{"train.beta": 0.1, **extra})
    finetune(load_config(DEFAULT, over), log=lambda _: 0)
    out[name] = [[m[k] for k in keys] for m in read_metrics(root / name) if "train_loss" in m]
print(json.dumps(out))
"""


def test_a_grpo_run_on_a_mesh_samples_and_trains_as_on_one_device(tmp_path):
    out = run_on_devices(_MESH_RUN, tmp_path)
    assert len(out["one"]) == 2
    # Same completions (lengths, rewards) through the sharded live adapters, same losses.
    np.testing.assert_allclose(out["mesh"], out["one"], rtol=1e-4, atol=1e-6)
