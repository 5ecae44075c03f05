"""Reading primitive parameters across JAX releases, and the JAX range CI claims to test."""

import pathlib
import tomllib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from packaging.specifiers import SpecifierSet

import jlora
from jlora import _factorised
from jlora._factorised.primitive_params import TESTED_JAX, PrimitiveParams, scan_operand_counts

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _eqn(name, params):
    return types.SimpleNamespace(primitive=types.SimpleNamespace(name=name), params=params)


def test_missing_parameter_names_primitive_key_and_jax_version():
    params = PrimitiveParams(_eqn("transpose", {"perm": (1, 0)}))
    with pytest.raises(RuntimeError, match=rf"'transpose' in JAX {jax.__version__}.*'permutation'"):
        params["permutation"]
    assert params.get("permutation") is None
    assert "perm" in params and "permutation" not in params
    assert dict(params) == {"perm": (1, 0)}


def test_a_rule_reading_a_renamed_parameter_fails_clearly():
    v = types.SimpleNamespace()  # never reached: the parameter is read first
    eqn = _eqn("concatenate", {"axis": 0})
    with pytest.raises(RuntimeError, match=r"no parameter 'dimension' \(it has: axis\)"):
        _factorised.RULES["concatenate"](None, eqn, [v])


def test_scan_counts_old_and_new_layouts():
    assert scan_operand_counts(
        PrimitiveParams(_eqn("scan", {"num_consts": 2, "num_carry": 3}))
    ) == (2, 3)
    groups = types.SimpleNamespace(unpack=lambda: ([1, 2], [3], [4, 5, 6]))
    assert scan_operand_counts(PrimitiveParams(_eqn("scan", {"ft_in": groups}))) == (2, 1)


def test_scan_counts_of_the_installed_jax():
    def f(c, xs, w):
        return lax.scan(lambda c, x: (c + x @ w, c.sum()), c, xs)

    jaxpr = jax.make_jaxpr(f)(jnp.ones(3), jnp.ones((4, 3)), jnp.ones((3, 3)))
    eqn = next(e for e in jaxpr.eqns if e.primitive.name == "scan")
    consts, carry = scan_operand_counts(PrimitiveParams(eqn))
    assert carry == 1
    assert len(eqn.invars) - consts - carry == 1  # xs


def test_scan_counts_unknown_layouts_fail_clearly():
    with pytest.raises(RuntimeError, match="neither 'ft_in' nor 'num_consts'"):
        scan_operand_counts(PrimitiveParams(_eqn("scan", {"length": 3})))
    groups = types.SimpleNamespace(unpack=lambda: ([1], [2]))
    with pytest.raises(RuntimeError, match="'ft_in' has 2 groups, not 3"):
        scan_operand_counts(PrimitiveParams(_eqn("scan", {"ft_in": groups})))


def test_scan_with_consts_carry_and_stacked_kernel_matches_merge():
    # A scan whose body closes over a plain array (a const), carries a value and slices a
    # stacked kernel: the three operand groups must be split where this JAX puts them.
    key = jax.random.key(0)
    params = {"layers": {"kernel": jax.random.normal(key, (3, 4, 4))}}
    cfg = jlora.LoraConfig(
        rank=2, alpha=2.0, targets=r".*kernel", axis_rules=[(".*", ("stack", "in", "out"))]
    )
    p = jlora.init_lora(key, params, cfg)
    p["layers"]["kernel_lora_b"] = jax.random.normal(jax.random.key(1), (3, 2, 4))
    bias = jnp.arange(4.0)

    def model(p, x):
        def body(h, w):
            h = jnp.tanh(h @ w + bias)
            return h, h.sum()

        return lax.scan(body, x, p["layers"]["kernel"])

    x = jnp.ones((2, 4))
    got = jax.jit(jlora.lora(model, cfg))(p, x)
    want = model(jlora.merge_params(p, cfg), x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


def test_pyproject_states_the_tested_jax_range_and_it_holds():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = {d.split(">")[0].split("<")[0].strip(): d for d in project["dependencies"]}
    jax_range = SpecifierSet(specs["jax"][len("jax") :])
    low, high = TESTED_JAX.split(" to ")
    assert low in jax_range and f"{high}.0" in jax_range
    assert jax.__version__ in jax_range, f"installed JAX {jax.__version__} is outside {jax_range}"
    lowest = (ROOT / ".ci" / "lowest.txt").read_text()
    assert f"jax=={low}" in lowest  # CI's first job runs the low end
