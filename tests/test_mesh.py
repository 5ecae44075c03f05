"""Regex partition rules and reading collectives back from compiled HLO."""

import json
import os
import subprocess
import sys
import textwrap

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


def _hlo(*computations):
    return "\n".join(["HloModule m, num_partitions=8", *computations])


def test_long_tuples_keep_every_result_past_xla_index_comments():
    shapes = ", ".join(
        (f"/*index={i}*/" if i and i % 5 == 0 else "") + "f32[16,16]{1,0}" for i in range(38)
    )
    found = jlora.collectives(f"%ar = ({shapes}) all-reduce(%a), replica_groups={{}}")
    assert len(found) == 1
    assert found[0].shapes == ((16, 16),) * 38
    assert found[0].nbytes == 38 * 16 * 16 * 4


def test_async_pairs_are_one_op_sized_by_their_done():
    hlo = "\n".join(
        [
            "%s = ((f32[4]{0}), f32[16]{0}) all-gather-start(f32[4]{0} %c), "
            "replica_groups=[1,4]<=[4], dimensions={0}",
            "%d = f32[16]{0} all-gather-done(((f32[4]{0}), f32[16]{0}) %s)",
        ]
    )
    (found,) = jlora.collectives(hlo)
    assert (found.kind, found.shapes, found.nbytes) == ("all-gather", ((16,),), 64)
    assert found.replica_groups == ((0, 1, 2, 3),)


@pytest.mark.parametrize(
    ("attrs", "groups"),
    [
        ("replica_groups={{0,1},{2,3}}", ((0, 1), (2, 3))),
        ("replica_groups={}", ((0, 1, 2, 3, 4, 5, 6, 7),)),  # all devices of the module
        ("replica_groups=[2,4]<=[8]", ((0, 1, 2, 3), (4, 5, 6, 7))),
        ("replica_groups=[4,2]<=[2,4]T(1,0)", ((0, 4), (1, 5), (2, 6), (3, 7))),
        ("replica_groups=mesh['x'=2,'y'=4] {'y'}", ((0, 1, 2, 3), (4, 5, 6, 7))),
        ("replica_groups=mesh['x'=2,'y'=4] {'y':(2)2}", ((0, 2), (1, 3), (4, 6), (5, 7))),
        (
            "replica_groups=mesh['x'=2,'y'=4], device_ids=([2,4]<=[4,2]T(1,0)) {'x'}",
            ((0, 1), (2, 3), (4, 5), (6, 7)),
        ),
        ("source_target_pairs={{0,1},{1,0},{2,3},{3,2}}", ((0, 1), (2, 3))),
    ],
)
def test_replica_groups_in_every_form_xla_prints(attrs, groups):
    op = "collective-permute" if "pairs" in attrs else "all-reduce"
    (found,) = jlora.collectives(
        _hlo(f"ENTRY %e () -> f32[8] {{\n  %x = f32[8]{{0}} {op}(%a), {attrs}\n}}")
    )
    assert found.replica_groups == groups
    assert found.axes is None  # no mesh given


def test_loops_multiply_counts_and_unknown_ones_say_so():
    def loop(name, body, trip):
        config = f', backend_config={{"known_trip_count":{{"n":"{trip}"}}}}' if trip else ""
        return f"  %{name} = (s32[]) while(%t), condition=%cond, body=%{body}{config}"

    hlo = _hlo(
        "%inner (p: s32[]) -> s32[] {",
        "  %ar = bf16[4]{0} all-reduce(%v), replica_groups={}, to_apply=%add",
        "}",
        "%outer (p: s32[]) -> s32[] {",
        loop("w1", "inner", 4),
        "}",
        "%unknown (p: s32[]) -> s32[] {",
        "  %ag = pred[8]{0} all-gather(%v), replica_groups={}, dimensions={0}",
        "}",
        "%branch (p: s32[]) -> s32[] {",
        "  %cp = s8[2]{0} collective-permute(%v), source_target_pairs={{0,1}}",
        "}",
        "%dead (p: s32[]) -> s32[] {",
        "  %rs = f32[2]{0} reduce-scatter(%v), replica_groups={}, dimensions={0}",
        "}",
        "ENTRY %main (a: s32[]) -> s32[] {",
        loop("w0", "outer", 3),
        loop("w2", "unknown", None),
        "  %c = s32[] conditional(%p, %a, %a), branch_computations={%branch, %outer}",
        "}",
    )
    found = {c.name: c for c in jlora.collectives(hlo)}
    assert sorted(found) == ["ag", "ar", "cp"]  # %dead is never called
    # %inner runs 3 * 4 times through w0, and 4 more times (maybe) through the conditional
    assert (found["ar"].count, found["ar"].count_exact) == (16, False)
    assert (found["ar"].nbytes, found["ar"].total_bytes) == (8, 128)
    assert (found["ag"].count, found["ag"].count_exact, found["ag"].nbytes) == (1, False, 8)
    assert (found["cp"].count, found["cp"].count_exact) == (1, False)


def test_a_single_loop_with_known_trip_count_is_exact():
    hlo = _hlo(
        "%body (p: s32[]) -> s32[] {",
        "  %ar = f32[4]{0} all-reduce(%v), replica_groups={}, to_apply=%add",
        "}",
        "ENTRY %main (a: s32[]) -> s32[] {",
        "  %w = (s32[]) while(%t), condition=%c, body=%body, "
        'backend_config="{\\"known_trip_count\\":{\\"n\\":\\"7\\"}}"',
        "}",
    )
    (found,) = jlora.collectives(hlo)
    assert (found.count, found.count_exact, found.total_bytes) == (7, True, 7 * 16)


def test_collectives_needs_a_compiled_program():
    lowered = jax.jit(lambda x: x * 2).lower(jnp.ones(3))
    with pytest.raises(TypeError, match=r"needs the compiled program.*\.compile\(\)"):
        jlora.collectives(lowered)
    with pytest.raises(TypeError, match=r"takes a jax.stages.Compiled or its HLO text, not int"):
        jlora.collectives(3)


def test_collectives_refuses_a_mesh_of_another_size():
    mesh = jax.make_mesh((1,), ("data",))
    hlo = _hlo("ENTRY %e () -> f32[8] {", "  %x = f32[8]{0} all-reduce(%a), replica_groups={}", "}")
    with pytest.raises(ValueError, match=r"runs on 8 devices but the mesh \{'data': 1\} has 1"):
        jlora.collectives(hlo, mesh)
    with pytest.raises(ValueError, match=r"op 'x' groups device 5, but the mesh .* has 1 devices"):
        jlora.collectives("%x = f32[8]{0} all-reduce(%a), replica_groups={{0,5}}", mesh)


_EIGHT_DEVICES = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jlora

    AUTO = (jax.sharding.AxisType.Auto,) * 2
    out = {}

    # full fine-tuning, data parallel: XLA all-reduces every kernel's gradient in one op
    mesh = jax.make_mesh((8,), ("data",))
    params = {f"l{i}": {"kernel": jnp.ones((16, 16))} for i in range(38)}

    def loss(p, x):
        for i in range(38):
            x = jnp.tanh(x @ p[f"l{i}"]["kernel"])
        return (x ** 2).mean()

    def step(p, x):
        return jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(loss)(p, x))

    rep = NamedSharding(mesh, P())
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), params)
    x = jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    full = jax.jit(step, out_shardings=rep).lower(like, x).compile()
    out["full"] = [(c.kind, c.shapes, c.nbytes, c.axes) for c in jlora.collectives(full, mesh)]

    # an all-reduce in the body of a length-5 scan
    mesh2 = jax.make_mesh((2, 4), ("a", "b"), axis_types=AUTO)
    body = lambda c, _: (c + jax.lax.psum(c, "b"), None)
    scan = jax.shard_map(lambda v: jax.lax.scan(body, v, None, length=5)[0], mesh=mesh2,
                         in_specs=P("a", "b"), out_specs=P("a", "b"))
    compiled = jax.jit(scan).lower(jax.ShapeDtypeStruct((4, 8), jnp.float32)).compile()
    out["scan"] = [(c.kind, c.count, c.count_exact, c.axes) for c in
                   jlora.collectives(compiled, mesh2)]

    # one reduction over each axis of a mesh whose devices are not in id order
    devices = np.array(jax.devices())[[3, 1, 2, 0, 7, 5, 6, 4]].reshape(2, 4)
    mesh3 = jax.sharding.Mesh(devices, ("a", "b"), axis_types=AUTO)
    two = jax.shard_map(lambda v: (jax.lax.psum(v, "a"), jax.lax.psum(v, "b")), mesh=mesh3,
                        in_specs=P("a", "b"), out_specs=(P(None, "b"), P("a", None)))
    compiled = jax.jit(two).lower(jax.ShapeDtypeStruct((4, 8), jnp.float32)).compile()
    out["axes"] = [(c.replica_groups, c.axes) for c in jlora.collectives(compiled, mesh3)]

    # groups that are half an axis, or single devices
    hlo = "%x = f32[8]{0} all-reduce(%a), replica_groups={{0,2},{1,3},{4,6},{5,7}}"
    out["half"] = jlora.collectives(hlo, mesh2)[0].axes
    hlo = "%x = f32[8]{0} all-reduce(%a), replica_groups=[8,1]<=[8]"
    out["single"] = jlora.collectives(hlo, mesh2)[0].axes
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    run = subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICES], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_full_fine_tuning_gradient_all_reduce_reports_every_kernel(eight_devices):
    (reduce,) = eight_devices["full"]
    kind, shapes, nbytes, axes = reduce
    assert (kind, len(shapes), axes) == ("all-reduce", 38, ["data"])
    assert all(s == [16, 16] for s in shapes)
    assert nbytes == 38 * 16 * 16 * 4


def test_a_collective_in_a_scan_body_counts_once_per_iteration(eight_devices):
    assert eight_devices["scan"] == [["all-reduce", 5, True, ["b"]]]


def test_replica_groups_name_the_mesh_axis_they_cross(eight_devices):
    over_a, over_b = eight_devices["axes"]
    # positions in mesh.devices.flat, whatever the devices' ids
    assert over_a == [[[0, 4], [1, 5], [2, 6], [3, 7]], ["a"]]
    assert over_b == [[[0, 1, 2, 3], [4, 5, 6, 7]], ["b"]]
    assert eight_devices["half"] is None
    assert eight_devices["single"] == []
