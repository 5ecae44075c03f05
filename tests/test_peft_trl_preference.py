"""jlora's preference objectives agree with TRL's own trainers on one model, adapter and batch.

A tiny random ``LlamaForCausalLM`` is built in PyTorch (fixed seed), saved as safetensors and
loaded into jlora with ``jlora.models.load_pretrained``. For each loss, TRL's trainer is built
on it with a PEFT ``LoraConfig`` (random non-zero A and B on q/v, ``init_lora_weights=False``)
and a word-level tokenizer; the trainer tokenizes three text pairs and collates them, then its
own loss code runs on that batch (``DPOTrainer.compute_loss``; ``get_batch_loss_metrics`` of
``CPOTrainer`` for SimPO and of ``ORPOTrainer``). The trainer's adapter is saved with PEFT and
read with ``jlora.import_peft``, its batch turned into jlora's ``[2B, T]`` pair batch, and
``jlora.dpo_loss`` must give the same loss and metrics to 1e-5 (relative, with 1e-6 absolute
for values near zero). The DPO reference is PEFT's model with the adapter disabled, which is
jlora's base with the adapters off. Needs the ``peft`` extra (torch, transformers, peft, trl).
"""

from __future__ import annotations

import os
from unittest import mock

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"  # CPO and ORPO live in trl.experimental
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import jlora  # noqa: E402
from jlora.models import load_pretrained  # noqa: E402
from jlora.models.decoder import PEFT_MAPPING  # noqa: E402

pytestmark = pytest.mark.peft

RTOL, ATOL = 1e-5, 1e-6
PAIRS = [
    {"prompt": "w1 w2 w3", "chosen": " w4 w5", "rejected": " w6 w7 w8"},
    {"prompt": "w9 w10", "chosen": " w11", "rejected": " w12 w13 w30 w31"},
    {"prompt": "w14 w15 w16 w17", "chosen": " w18 w19 w20 w32", "rejected": " w21"},
]
METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]
AGREEMENT: dict[str, tuple[float, str, float]] = {}  # worst relative difference per case


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves ``os.environ`` as it found it.

    ``TrainingArguments.__post_init__`` writes ``ACCELERATE_MIXED_PRECISION`` (``bf16``: the
    TRL configs' default) into the process's environment, and a later trainer with
    ``bf16=False`` keeps it: TRL's GRPOTrainer would then score under bf16 autocast.
    """
    with mock.patch.dict(os.environ):
        yield


def _tokenizer():
    words = [f"w{i}" for i in range(40)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The torch model's directory, and the same model loaded into jlora."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=43,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # a model whose predictions differ from uniform
        for p in model.parameters():
            p.mul_(8.0 if p.ndim == 2 else 1.0)
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory, safe_serialization=True)
    loaded = load_pretrained(directory)
    return directory, loaded


def _torch_model(directory):
    model = transformers.LlamaForCausalLM.from_pretrained(directory, attn_implementation="eager")
    return model.float()


def _peft_config():
    return peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )


def _jlora_params(trainer, loaded, tmp_path):
    """The trainer's PEFT adapter, saved by PEFT and imported onto jlora's base."""
    trainer.model.save_pretrained(tmp_path / "adapter")
    params, cfg = jlora.import_peft(tmp_path / "adapter", loaded.params, PEFT_MAPPING)
    lora, _ = jlora.split(params)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(lora))  # A and B both moved
    return params, cfg


def _shifted(x):
    """``x[:, 1:]`` padded back to ``T`` with zeros: what position t predicts."""
    x = np.asarray(x)
    return np.concatenate([x[:, 1:], np.zeros_like(x[:, :1])], axis=1)


def _apply(loaded):
    return lambda p, tokens: loaded.model.apply({"params": p}, tokens)


def _agree(case, got, want, beta=None):
    """Asserts jlora's (loss, metrics) equal TRL's; records the worst relative difference.

    With a reference (``beta`` given), ``rewards/*`` are ``β·(logp - ref_logp)``: differences
    of two float32 sums over the completion, each rounded to its own ulp in either library, so
    they are compared to within 4 ulps of those sums (``β·4·ulp(|logp|)``) besides ``RTOL``.
    """
    loss, metrics = got
    want_loss, want_metrics = want
    pairs = [("loss", float(loss), float(want_loss))]
    pairs += [(k, float(metrics[k]), float(want_metrics[k])) for k in want_metrics]
    scale = max(abs(want_metrics["logps/chosen"]), abs(want_metrics["logps/rejected"]))
    worst = (0.0, "")
    for name, a, b in pairs:
        atol = ATOL
        if beta is not None and name.startswith("rewards/"):
            atol = max(ATOL, beta * 4 * float(np.spacing(np.float32(2 * scale))))
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=atol, err_msg=f"{case}: {name}")
        worst = max(worst, (abs(a - b) / abs(b) if b else abs(a - b), name))
    AGREEMENT[case] = (*worst, abs(float(loss) - want_loss) / abs(want_loss))


# ---- DPOTrainer: sigmoid, robust, ipo (reference: the adapter disabled) ----


def _dpo(base, tmp_path, pairs=PAIRS, **options):
    directory, loaded = base
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=len(pairs),
        **options,
    )
    trainer = trl.DPOTrainer(
        model=_torch_model(directory),
        args=args,
        train_dataset=datasets.Dataset.from_list(pairs),
        processing_class=_tokenizer(),
        peft_config=_peft_config(),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    for store in trainer._metrics.values():
        store.clear()
    loss = trainer.compute_loss(trainer.model, batch)
    mode = "train" if trainer.model.training else "eval"
    metrics = {k: trainer._metrics[mode][k][-1] for k in METRICS}
    ours = {
        "tokens": jnp.asarray(batch["input_ids"].numpy()),
        "targets": jnp.asarray(_shifted(batch["input_ids"].numpy())),
        "loss_mask": jnp.asarray(_shifted(batch["completion_mask"].numpy()) == 1),
    }
    params, cfg = _jlora_params(trainer, loaded, tmp_path)
    return (loss.item(), metrics), params, cfg, ours


@pytest.mark.parametrize(
    ("case", "options"),
    [
        ("sigmoid", {"beta": 0.5}),
        ("robust", {"beta": 0.5, "loss_type": "robust", "label_smoothing": 0.2}),
        ("ipo", {"beta": 0.5, "loss_type": "ipo"}),
        # TRL 1.16 applies label_smoothing only to robust/exo_pair/aot: its sigmoid loss with
        # label_smoothing=0.2 is plain DPO, which jlora gives with label_smoothing=0
        ("sigmoid_trl_ignores_smoothing", {"beta": 0.5, "label_smoothing": 0.2}),
    ],
)
def test_dpo_trainer(base, tmp_path, case, options):
    want, params, cfg, batch = _dpo(base, tmp_path, **options)
    jl_options = {"loss_type": options.get("loss_type", "sigmoid"), "beta": options["beta"]}
    if jl_options["loss_type"] == "robust":
        jl_options["label_smoothing"] = options["label_smoothing"]
    got = jlora.dpo_loss(_apply(base[1]), params, cfg, batch, **jl_options)
    assert abs(want[1]["rewards/margins"]) > 1e-2  # the adapter moves the policy off the base
    _agree(f"DPOTrainer {case}", got, want, beta=options["beta"])


@pytest.mark.parametrize("index", range(len(PAIRS)))
def test_conservative_dpo_equals_trl_aot_on_one_pair(base, tmp_path, index):
    """jlora's sigmoid with label smoothing (cDPO) against the one TRL 1.16 DPO loss with that
    formula, ``aot``: it sorts the batch's log-ratios, which is the identity for one pair."""
    want, params, cfg, batch = _dpo(
        base,
        tmp_path,
        pairs=[PAIRS[index]],
        beta=0.5,
        loss_type="aot",
        label_smoothing=0.2,
    )
    got = jlora.dpo_loss(_apply(base[1]), params, cfg, batch, beta=0.5, label_smoothing=0.2)
    _agree(f"DPOTrainer aot = cDPO, pair {index}", got, want, beta=0.5)


def test_dpo_at_init_is_ln2_in_both(base, tmp_path):
    """PEFT's default init (B = 0): TRL's loss and jlora's are ln 2, the rewards 0."""
    directory, loaded = base
    trainer = trl.DPOTrainer(
        model=_torch_model(directory),
        args=trl.DPOConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, beta=0.1),
        train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=_tokenizer(),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    loss = trainer.compute_loss(trainer.model, batch).item()
    trainer.model.save_pretrained(tmp_path / "adapter")
    params, cfg = jlora.import_peft(tmp_path / "adapter", loaded.params, PEFT_MAPPING)
    ours = {
        "tokens": jnp.asarray(batch["input_ids"].numpy()),
        "targets": jnp.asarray(_shifted(batch["input_ids"].numpy())),
        "loss_mask": jnp.asarray(_shifted(batch["completion_mask"].numpy()) == 1),
    }
    got, metrics = jlora.dpo_loss(_apply(loaded), params, cfg, ours)
    assert float(got) == np.float32(np.log(2.0))
    assert loss == pytest.approx(np.log(2.0), rel=1e-6)
    # the policy (through jlora.lora, B = 0) and the reference are separate programs: XLA may
    # round their attention differently, so the margin is 0 to f32 rounding, not bitwise
    assert float(metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)


# ---- CPOTrainer (SimPO) and ORPOTrainer: reference-free, averaged log-probabilities ----


def _pair_trainer(kind, base, tmp_path, **options):
    """A CPO or ORPO trainer's loss and metrics on the three pairs, and jlora's inputs."""
    directory, loaded = base
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    config_cls, trainer_cls = {"cpo": (CPOConfig, CPOTrainer), "orpo": (ORPOConfig, ORPOTrainer)}[
        kind
    ]
    args = config_cls(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        max_length=64,
        remove_unused_columns=False,
        per_device_train_batch_size=len(PAIRS),
        **options,
    )
    trainer = trainer_cls(
        model=_torch_model(directory),
        args=args,
        train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=_tokenizer(),
        peft_config=_peft_config(),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    pad = getattr(trainer, "padding_value", None)
    joined = trainer.concatenated_inputs(
        batch, is_encoder_decoder=False, padding_value=trainer.pad_token_id if pad is None else pad
    )
    tokens = joined["concatenated_input_ids"].numpy()
    ours = {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(_shifted(tokens)),
        "loss_mask": jnp.asarray(_shifted(joined["concatenated_labels"].numpy() != -100) == 1),
    }
    # ORPO's NLL counts every non-padding token of prompt and answer (TRL's choice)
    nll_mask = jnp.asarray(_shifted(joined["concatenated_attention_mask"].numpy()) == 1)
    params, cfg = _jlora_params(trainer, loaded, tmp_path)
    return (loss.item(), metrics), params, cfg, ours, nll_mask


@pytest.mark.parametrize(
    ("case", "options"),
    [
        ("simpo", {"beta": 2.0, "simpo_gamma": 0.3}),
        ("simpo_smoothed", {"beta": 2.0, "simpo_gamma": 0.3, "label_smoothing": 0.15}),
    ],
)
def test_cpo_trainer_simpo(base, tmp_path, case, options):
    # cpo_alpha=0: SimPO alone (TRL's default 1.0 adds CPO's NLL term)
    want, params, cfg, batch, _ = _pair_trainer(
        "cpo", base, tmp_path, loss_type="simpo", cpo_alpha=0.0, **options
    )
    got = jlora.dpo_loss(
        _apply(base[1]),
        params,
        cfg,
        batch,
        loss_type="simpo",
        beta=options["beta"],
        gamma=options["simpo_gamma"],
        label_smoothing=options.get("label_smoothing", 0.0),
    )
    _agree(f"CPOTrainer {case}", got, (want[0], {k: want[1][k] for k in METRICS}))


def test_orpo_trainer(base, tmp_path):
    want, params, cfg, batch, nll_mask = _pair_trainer("orpo", base, tmp_path, beta=0.25)
    batch = {**batch, "nll_mask": nll_mask}
    got = jlora.dpo_loss(_apply(base[1]), params, cfg, batch, loss_type="orpo", beta=0.25)
    keys = [*METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen"]
    _agree("ORPOTrainer", got, (want[0], {k: want[1][k] for k in keys}))


@pytest.fixture(scope="module", autouse=True)
def _report_agreement(pytestconfig):
    """Prints each case's worst relative difference after the module's tests."""
    yield
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    if capture is None or not AGREEMENT:
        return
    with capture.global_and_fixture_disabled():
        print("\nworst relative difference, jlora vs TRL, per case (the quantity):")
        for case, (worst, name, loss) in AGREEMENT.items():
            print(f"  {case}: {worst:.1e} ({name}); loss {loss:.1e}")
