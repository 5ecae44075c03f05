"""Regex partition rules and reading collectives back from compiled HLO."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import jlora


def test_partition_specs_first_match_wins_and_default_replicates():
    params = {
        "a": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)},
        "b": {"kernel": jnp.ones((8, 2))},
    }
    specs = jlora.partition_specs(params, [(r"a/kernel", P("x")), (r".*kernel", P(None, "y"))])
    assert specs == {"a": {"kernel": P("x"), "bias": P()}, "b": {"kernel": P(None, "y")}}


def test_partition_spec_longer_than_the_leaf():
    with pytest.raises(ValueError, match=r"matches 'a/bias', which has 1 axes"):
        jlora.partition_specs({"a": {"bias": jnp.ones(3)}}, [(r".*", P("x", "y"))])


def test_collectives_parses_tuples_async_and_dtypes():
    hlo = "\n".join(
        [
            "%x = (f32[4,2]{1,0}, bf16[8]{0}) all-reduce(%a, %b), to_apply=%add",
            "%y = f32[16]{0} all-gather-start(f32[4]{0} %c), dimensions={0}",
            "%z = f32[2,2]{1,0} add(%p, %q)",
        ]
    )
    found = jlora.collectives(hlo)
    assert [(c.kind, c.shapes, c.nbytes) for c in found] == [
        ("all-reduce", ((4, 2), (8,)), 4 * 8 + 2 * 8),
        ("all-gather", ((16,),), 64),
    ]
    assert found[0].largest == 8


def test_collectives_of_a_real_compiled_program():
    compiled = jax.jit(lambda x: x * 2).lower(jnp.ones(3)).compile()
    assert jlora.collectives(compiled) == []  # one device: nothing to communicate
