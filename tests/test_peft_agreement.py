"""jlora agrees with the installed PEFT where both compute the same thing.

Each test builds a tiny PyTorch model, gives it LoRA adapters in ``peft`` itself, and compares
what PEFT computes (delta weights, saved files) with what jlora computes from the same numbers.
Needs the ``peft`` extra; skipped without it.
"""

from __future__ import annotations

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jlora  # noqa: E402

pytestmark = [pytest.mark.peft]

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


def test_combine_adapters_with_rslora_keeps_scale_one_where_peft_gives_sqrt_r():
    # PEFT copies use_rslora into the new adapter with lora_alpha = r, so its scale is sqrt(r):
    # jlora deliberately keeps the weighted sum (documented in jlora/_combination.py).
    specs = {"x": (4, 4), "y": (4, 2)}
    model = peft_pair(specs, use_rslora=True)
    model.add_weighted_adapter(["x", "y"], [0.7, -1.5], "c", combination_type="cat")
    fc = model.base_model.model.fc
    base, bank = jlora_bank(model, specs, use_rslora=True)
    got = jlora.combine_adapters(base, bank, WEIGHTS, method="cat")
    assert fc.scaling["c"] == pytest.approx(math.sqrt(8))
    close(jlora_delta(base, got) * math.sqrt(8), _np(fc.get_delta_weight("c")))
    exact = sum(w * _np(fc.get_delta_weight(n)) for n, w in WEIGHTS.items())
    close(jlora_delta(base, got), exact)
