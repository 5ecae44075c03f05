"""jlora agrees with the installed PEFT where both compute the same thing.

Each test builds a tiny PyTorch model, gives it LoRA adapters in ``peft`` itself, and compares
what PEFT computes (delta weights, saved files) with what jlora computes from the same numbers.
Needs the ``peft`` extra; skipped without it.
"""

from __future__ import annotations

import json
import math
import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

import jlora  # noqa: E402

pytestmark = [
    pytest.mark.peft,
    # PEFT announces that it copies embed_tokens / lm_head, and that LoRA on a tied lm_head
    # needs care when merging in PyTorch; import_peft checks those copies.
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
]

FAN_IN, FAN_OUT = 5, 6
WEIGHTS = {"x": 0.7, "y": -1.5}


class Tiny(torch.nn.Module):
    """One ``Linear(5, 6)``: its weight is ``(out, in)``, jlora's kernel ``(in, out)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(FAN_IN, FAN_OUT)

    def forward(self, x):
        return self.fc(x)


def _np(t) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


def peft_pair(specs: dict[str, tuple[int, float]], use_rslora: bool = False):
    """A PEFT model with one adapter per ``name: (r, alpha)``, all factors random."""
    torch.manual_seed(0)
    model = None
    for name, (r, alpha) in specs.items():
        cfg = peft.LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=["fc"],
            init_lora_weights=False,  # random B too, so every adapter moves the weight
            use_rslora=use_rslora,
        )
        if model is None:
            model = peft.get_peft_model(Tiny(), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model


def jlora_bank(model, specs: dict[str, tuple[int, float]], use_rslora: bool = False):
    """The same base and adapters as jlora trees: A = lora_A.T, B = lora_B.T."""
    fc = model.base_model.model.fc
    base = {"fc": {"kernel": jnp.asarray(_np(fc.base_layer.weight).T, jnp.float32)}}
    bank = {}
    for name, (r, alpha) in specs.items():
        lora = {
            "fc": {
                "kernel_lora_a": jnp.asarray(_np(fc.lora_A[name].weight).T, jnp.float32),
                "kernel_lora_b": jnp.asarray(_np(fc.lora_B[name].weight).T, jnp.float32),
            }
        }
        cfg = jlora.LoraConfig(rank=r, alpha=float(alpha), use_rslora=use_rslora)
        bank[name] = jlora.Adapter(lora, cfg)
    return base, bank


def jlora_delta(base, adapter) -> np.ndarray:
    """The combined adapter's ``ΔW`` as PyTorch lays it out, ``(out, in)``."""
    params = jlora.combine(adapter.lora, base)
    merged = jlora.merge_params(params, adapter.config)
    return (np.asarray(merged["fc"]["kernel"], np.float64) - np.asarray(base["fc"]["kernel"])).T


def close(got, want, tol=1e-5):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def rel(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# ---- combine_adapters against add_weighted_adapter ---------------------------------------------


@pytest.mark.parametrize(
    "method, specs",
    [
        ("linear", {"x": (2, 4), "y": (2, 2)}),  # same rank, scales 2 and 1
        ("cat", {"x": (2, 4), "y": (3, 2)}),  # scales 2 and 2/3
        ("svd", {"x": (2, 4), "y": (3, 2)}),
    ],
)
def test_combine_adapters_matches_peft_add_weighted_adapter(method, specs):
    model = peft_pair(specs)
    model.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "c", combination_type=method)
    fc = model.base_model.model.fc
    base, bank = jlora_bank(model, specs)

    got = jlora.combine_adapters(base, bank, WEIGHTS, method=method)

    want = _np(fc.get_delta_weight("c"))
    close(jlora_delta(base, got), want)
    # The new adapter: PEFT's r = lora_alpha = new rank (scale 1), jlora's scale 1.
    assert fc.scaling["c"] == 1.0 == got.config.scale_for("fc/kernel")
    assert got.config.rank_for("fc/kernel") == fc.lora_A["c"].weight.shape[0]
    if method != "svd":  # SVD factors are unique only up to signs; the delta is compared
        close(np.asarray(got.lora["fc"]["kernel_lora_a"]).T, _np(fc.lora_A["c"].weight))
        close(np.asarray(got.lora["fc"]["kernel_lora_b"]).T, _np(fc.lora_B["c"].weight))
    exact = sum(w * _np(fc.get_delta_weight(n)) for n, w in WEIGHTS.items())
    if method == "linear":
        # The scales differ, so the old formula (sqrt(|w|) on B, w·s on A) gives another result:
        # this comparison would catch it.
        old_a = sum(
            math.copysign(math.sqrt(abs(w)), w) * fc.scaling[n] * _np(fc.lora_A[n].weight)
            for n, w in WEIGHTS.items()
        )
        old_b = sum(math.sqrt(abs(w)) * _np(fc.lora_B[n].weight) for n, w in WEIGHTS.items())
        assert rel(old_b @ old_a, want) > 0.05
        assert rel(want, exact) > 0.05  # linear is an approximation: cross terms
    elif method == "cat":
        close(want, exact)
    else:  # the best rank-3 (the larger rank, PEFT's svd_rank=None) part of the exact sum
        u, s, vt = np.linalg.svd(exact)
        close(want, (u[:, :3] * s[:3]) @ vt[:3])
        assert rel(want, exact) > 0.01


def test_combine_adapters_svd_rank_defaults_to_the_largest_and_truncates_like_peft():
    specs = {"x": (2, 4), "y": (3, 2)}
    model = peft_pair(specs)
    model.add_weighted_adapter(["x", "y"], [0.7, -1.5], "c1", combination_type="svd", svd_rank=1)
    fc = model.base_model.model.fc
    base, bank = jlora_bank(model, specs)
    got = jlora.combine_adapters(base, bank, WEIGHTS, method="svd", rank=1)
    close(jlora_delta(base, got), _np(fc.get_delta_weight("c1")))
    assert jlora.combine_adapters(base, bank, WEIGHTS, method="svd").config.rank == 3


def test_combine_adapters_with_rslora_keeps_scale_one_as_peft_0_22_does():
    # PEFT before 0.22 copied use_rslora into the new adapter with lora_alpha = r, so its scale
    # was sqrt(r); 0.22 gives scale 1, the weighted sum, which jlora always kept
    # (documented in jlora/_combination.py).
    from packaging.version import Version

    specs = {"x": (4, 4), "y": (4, 2)}
    model = peft_pair(specs, use_rslora=True)
    model.add_weighted_adapter(["x", "y"], [0.7, -1.5], "c", combination_type="cat")
    fc = model.base_model.model.fc
    base, bank = jlora_bank(model, specs, use_rslora=True)
    got = jlora.combine_adapters(base, bank, WEIGHTS, method="cat")
    peft_scale = math.sqrt(8) if Version(peft.__version__) < Version("0.22") else 1.0
    assert fc.scaling["c"] == pytest.approx(peft_scale)
    close(jlora_delta(base, got) * peft_scale, _np(fc.get_delta_weight("c")))
    exact = sum(w * _np(fc.get_delta_weight(n)) for n, w in WEIGHTS.items())
    close(jlora_delta(base, got), exact)


# ---- import_peft of PEFT's default save of an adapter on lm_head --------------------------------


def tiny_llama(tied: bool):
    cfg = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=24,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def jax_base(model) -> dict:
    """The Flax-Llama-shaped base of a PyTorch model: ``(in, out)`` kernels, embedding tables."""
    base: dict = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module = module.base_layer
        if "lora_" in name or "base_layer" in name:
            continue
        if isinstance(module, torch.nn.Linear):
            leaf = {"kernel": jnp.asarray(_np(module.weight).T, jnp.float32)}
        elif isinstance(module, torch.nn.Embedding):
            leaf = {"embedding": jnp.asarray(_np(module.weight), jnp.float32)}
        else:
            continue
        *parents, last = name.split(".")
        node = base
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return base


def save_peft(model, path, targets, **save_kwargs):
    """A PEFT adapter on ``targets`` with random factors, saved as ``save_pretrained`` does."""
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    )
    pm.save_pretrained(path, **save_kwargs)
    return pm


@pytest.mark.parametrize("tied", [True, False])
def test_import_peft_accepts_peft_default_save_of_an_lm_head_adapter(tmp_path, tied):
    model = tiny_llama(tied)
    base = jax_base(model)
    pm = save_peft(model, tmp_path, ["q_proj", "lm_head"])
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.base_layer.weight" in keys  # what used to be refused

    params, cfg = jlora.import_peft(tmp_path, base, jlora.peft.LLAMA)

    merged = jlora.merge_params(params, cfg)
    torch_model = pm.base_model.model
    for module, path in [
        (torch_model.lm_head, ("lm_head",)),
        (
            torch_model.model.layers[0].self_attn.q_proj,
            ("model", "layers", "0", "self_attn", "q_proj"),
        ),
    ]:
        got = merged
        want = base
        for part in path:
            got, want = got[part], want[part]
        delta = np.asarray(got["kernel"], np.float64) - np.asarray(want["kernel"], np.float64)
        close(delta.T, _np(module.get_delta_weight("default")))


def test_import_peft_refuses_an_lm_head_copy_that_differs_from_the_base(tmp_path):
    model = tiny_llama(True)
    base = jax_base(model)
    save_peft(model, tmp_path, ["q_proj", "lm_head"])
    kernel = base["lm_head"]["kernel"]
    moved = {**base, "lm_head": {"kernel": kernel.at[3, 5].add(0.5)}}
    with pytest.raises(
        ValueError,
        match=r"key 'base_model\.model\.lm_head\.base_layer\.weight' holds full base weights, "
        r"PEFT's copy of the kernel 'lm_head/kernel' that differs from base_params' by up to "
        r"0\.5 .*not the base the adapter was trained on",
    ):
        jlora.import_peft(tmp_path, moved, jlora.peft.LLAMA)
    wider = {**base, "lm_head": {"kernel": jnp.zeros((16, 25))}}
    with pytest.raises(
        ValueError,
        match=r"'lm_head/kernel' that differs from base_params' in shape: \(24, 16\) "
        r"against \(25, 16\) \(in PyTorch's layout\)\. The vocabulary was resized",
    ):
        jlora.import_peft(tmp_path, wider, jlora.peft.LLAMA)


def test_import_peft_checks_copies_of_unadapted_embedding_layers(tmp_path):
    # save_embedding_layers=True copies embed_tokens and lm_head even where no LoRA sits.
    model = tiny_llama(False)
    base = jax_base(model)
    save_peft(model, tmp_path, ["q_proj"], save_embedding_layers=True)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= keys
    params, _ = jlora.import_peft(tmp_path, base, jlora.peft.LLAMA)
    assert sorted(params["lm_head"]) == ["kernel"]
    table = base["model"]["embed_tokens"]["embedding"]
    moved = {**base, "model": {**base["model"], "embed_tokens": {"embedding": table * 2}}}
    with pytest.raises(ValueError, match=r"copy of the embedding table 'model/embed_tokens/emb"):
        jlora.import_peft(tmp_path, moved, jlora.peft.LLAMA)
    headless = {k: v for k, v in base.items() if k != "lm_head"}
    with pytest.raises(
        ValueError,
        match=r"key 'base_model\.model\.lm_head\.weight' is not a LoRA factor: it holds full "
        r"weights of module 'lm_head', but no un-adapted kernel of base_params",
    ):
        jlora.import_peft(tmp_path, headless, jlora.peft.LLAMA)


# ---- fan_in_fan_out: what PEFT does with it ------------------------------------------------------


@pytest.mark.parametrize("file_flag", [True, False])
def test_import_peft_gpt2_square_kernel_agrees_with_peft_for_either_fan_in_fan_out(
    tmp_path, file_flag
):
    # PEFT's lora_A is (r, in) and lora_B (out, r) whatever fan_in_fan_out says: the flag only
    # tells how the update lies on the stored weight, and PEFT sets it from the layer type
    # (Conv1D -> True, Linear -> False, with a warning). So an adapter file saying false over
    # GPT-2's Conv1D means exactly what it means with true, for PEFT and for jlora.
    cfg = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=20, n_positions=8)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["attn.c_proj"],
            init_lora_weights=False,
            fan_in_fan_out=True,
        ),
    )
    pm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = file_flag
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    fresh = transformers.GPT2LMHeadModel(cfg).eval()
    fresh.load_state_dict(weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    layer = loaded.base_model.model.transformer.h[0].attn.c_proj
    assert layer.fan_in_fan_out is True  # PEFT overrode the file's false for Conv1D
    assert any("Setting fan_in_fan_out to True" in str(w.message) for w in caught) != file_flag
    want = _np(layer.get_delta_weight("default"))  # (in, out), as Conv1D stores it
    assert want.shape == (8, 8)

    w = weights["transformer.h.0.attn.c_proj.weight"].numpy()
    base = {"transformer": {"h": {"0": {"attn": {"c_proj": {"kernel": jnp.asarray(w.T)}}}}}}
    params, lcfg = jlora.import_peft(tmp_path, base, jlora.peft.GPT2)  # Flax GPT-2: (out, in)
    merged = jlora.merge_params(params, lcfg)["transformer"]["h"]["0"]["attn"]["c_proj"]
    got = np.asarray(merged["kernel"], np.float64) - w.T
    close(got.T, want)
    assert rel(got, want) > 0.5  # square, so only the values tell a transposed update apart
