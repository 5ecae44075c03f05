"""Numbers that make no sense are refused on entry: ``LoraConfig`` and the runner's config."""

import math

import pytest
from runner_helpers import DEFAULT

import jlora
from jlora.runner.config import RunConfig, from_dict, load_config

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": NAN}, r"LoraConfig\.alpha must be a finite number > 0; got nan"),
        ({"alpha": INF}, r"LoraConfig\.alpha must be a finite number > 0; got inf"),
        ({"alpha": -INF}, r"LoraConfig\.alpha must be a finite number > 0; got -inf"),
        ({"dropout": NAN}, r"LoraConfig\.dropout must be a finite number >= 0; got nan"),
        ({"dropout": INF}, r"LoraConfig\.dropout must be a finite number >= 0; got inf"),
        ({"alpha_pattern": {"a": NAN}}, r"alpha_pattern\['a'\] must be a finite number > 0"),
    ],
)
def test_lora_config_refuses_nan_and_inf(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jlora.LoraConfig(**kwargs)


def test_lora_config_still_takes_ordinary_numbers():
    cfg = jlora.LoraConfig(alpha=1e-8, dropout=0.0, alpha_pattern={"a": 3})
    assert (cfg.alpha, cfg.dropout, cfg.alpha_pattern["a"]) == (1e-8, 0.0, 3)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.learning_rate=0", r"train\.learning_rate: must be a finite number > 0, found 0\.0"),
        ("train.learning_rate=-1e-3", r"train\.learning_rate: must be a finite number > 0"),
        (
            "train.learning_rate=.nan",
            r"train\.learning_rate: must be a finite number > 0, found nan",
        ),
        (
            "train.learning_rate=.inf",
            r"train\.learning_rate: must be a finite number > 0, found inf",
        ),
        ("train.head_learning_rate=-1", r"train\.head_learning_rate: must be a finite number > 0"),
        (
            "train.head_learning_rate=.nan",
            r"train\.head_learning_rate: must be a finite number > 0",
        ),
        ("train.loraplus_lr_ratio=0", r"train\.loraplus_lr_ratio: must be a finite number > 0"),
        ("train.warmup_steps=-1", r"train\.warmup_steps: must be >= 0, found -1"),
        ("train.seed=-3", r"train\.seed: must be >= 0, found -3"),
        ("train.steps=-5", r"train\.steps: must be >= 1, found -5"),
        ("train.batch_size=0", r"train\.batch_size: must be >= 1, found 0"),
        ("train.log_every=-1", r"train\.log_every: must be >= 1"),
        ("train.eval_every=0", r"train\.eval_every: must be >= 1"),
        ("train.checkpoint_every=-2", r"train\.checkpoint_every: must be >= 1"),
        ("train.keep_checkpoints=0", r"train\.keep_checkpoints: must be >= 1"),
        ("train.eval_batches=0", r"train\.eval_batches: must be >= 1"),
        ("lora.alpha=.nan", r"lora\.alpha: must be a finite number > 0, found nan"),
        ("lora.alpha=0", r"lora\.alpha: must be a finite number > 0"),
        ("lora.dropout=-0.1", r"lora\.dropout: must be in \[0, 1\), found -0\.1"),
        ("lora.dropout=1", r"lora\.dropout: must be in \[0, 1\), found 1\.0"),
        ("lora.dropout=.nan", r"lora\.dropout: must be in \[0, 1\), found nan"),
        ("data.val_fraction=.nan", r"data\.val_fraction: must be in \(0, 1\), found nan"),
        ("generate.temperature=-0.5", r"generate\.temperature: must be a finite number >= 0"),
        ("generate.temperature=.inf", r"generate\.temperature: must be a finite number >= 0"),
        ("generate.max_new_tokens=-5", r"generate\.max_new_tokens: must be >= 0, found -5"),
    ],
)
def test_runner_config_refuses_numbers_that_make_no_sense(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(DEFAULT, [override])


def test_runner_config_takes_the_edge_values_that_do_make_sense():
    cfg = load_config(
        DEFAULT,
        [
            "train.warmup_steps=0",
            "train.seed=0",
            "lora.dropout=0",
            "generate.temperature=0",
            "generate.max_new_tokens=0",
        ],
    )
    assert cfg.train.warmup_steps == 0 and cfg.generate.temperature == 0.0


def test_a_nan_in_a_yaml_file_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: .nan\n")
    with pytest.raises(ValueError, match=r"config train\.learning_rate: must be a finite"):
        load_config(str(path))
    with pytest.raises(ValueError, match=r"config mesh\.data: must be >= 1, found 0"):
        from_dict(RunConfig, {"mesh": {"data": 0}})


def test_optional_float_keys_take_ints_and_null_and_refuse_text():
    from jlora.runner.config import RunConfig, from_dict

    assert from_dict(RunConfig, {"train": {"clip_norm": 1}}).train.clip_norm == 1.0
    assert from_dict(RunConfig, {"train": {"clip_norm": None}}).train.clip_norm is None
    with pytest.raises(TypeError, match=r"train.clip_norm: expected float or null, found 'x'"):
        from_dict(RunConfig, {"train": {"clip_norm": "x"}})


def test_the_default_config_states_only_what_differs_from_the_defaults():
    """The defaults live in one place, the dataclasses; default.yaml does not copy them."""
    from jlora.runner.config import RunConfig, config_path, load_config, to_dict
    from jlora.runner.yamlfile import read_yaml

    def flat(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    defaults = dict(flat(to_dict(RunConfig())))
    stated = dict(flat(read_yaml(config_path("default")) or {}))
    copied = {k for k, v in stated.items() if defaults[k] == v}
    assert not copied
    assert load_config("default") == RunConfig()
