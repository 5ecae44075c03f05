"""``jlora.lora``: run any JAX function on adapted trees without ever forming ``W + s·A·B``.

The wrapped function is traced once per call with the adapted kernels' base ``W`` in place
(so it sees exactly the tree structure it was written for), and the resulting jaxpr is
interpreted with each adapted kernel carried symbolically until the primitive that consumes
it, which then computes ``x·W + s·((x·A)·B)`` (see ``interpret`` and ``consume``). No W-sized
weight and, when only adapters are differentiated, no W-sized gradient is ever formed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.tree_util import DictKey, SequenceKey

from jlora._config import LoraConfig
from jlora._factorised.dropout import Dropout
from jlora._factorised.eager import compile_eager, is_input
from jlora._factorised.interpret import concrete, interpret
from jlora._factorised.quantized_view import view
from jlora._factorised.rule import Context
from jlora._factorised.value import LoraValue
from jlora._paths import KeyPath
from jlora._qlora import dequantize
from jlora._quantized import is_quantized
from jlora._resolve import resolve_sites
from jlora._split import combine, split

ON_UNSUPPORTED = ("raise", "merge")


def _check_options(
    config: LoraConfig, on_unsupported: str, dropout_rng: Any, deterministic: bool
) -> Dropout:
    if not isinstance(config, LoraConfig):
        raise TypeError(f"jlora.lora expects a LoraConfig; got {type(config).__name__}")
    if on_unsupported not in ON_UNSUPPORTED:
        raise ValueError(f"on_unsupported must be one of {ON_UNSUPPORTED}; got {on_unsupported!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a Python bool; got {deterministic!r}")
    if deterministic or config.dropout == 0.0:
        return Dropout()
    if dropout_rng is None:
        raise ValueError(
            f"LoRA dropout {config.dropout} is on (deterministic=False) but no dropout_rng was "
            "given; pass dropout_rng=<a PRNG key, new each step>, or deterministic=True for eval"
        )
    return Dropout(config.dropout, dropout_rng)


def _dense_shape(leaf: Any) -> Any:
    """What ``fn`` is traced with: a quantised kernel stands in as its dense shape."""
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if is_quantized(leaf) else leaf


def _strip(
    args: tuple[Any, ...], kwargs: dict[str, Any], config: LoraConfig
) -> tuple[tuple[Any, ...], dict[str, Any], dict[KeyPath, Any]]:
    """The arguments with adapters removed, and the adapted kernels by their flat path."""
    found: dict[KeyPath, Any] = {}
    places = [((SequenceKey(0), SequenceKey(i)), a) for i, a in enumerate(args)]
    places += [((SequenceKey(1), DictKey(k)), a) for k, a in kwargs.items()]
    stripped = []
    for prefix, arg in places:
        sites = resolve_sites(arg, config)
        for adapted in sites:
            found[(*prefix, *adapted.site.path)] = adapted
        stripped.append(split(arg)[1] if sites else arg)
    return (
        tuple(stripped[: len(args)]),
        dict(zip(kwargs, stripped[len(args) :], strict=True)),
        found,
    )


def lora(
    fn: Callable[..., Any],
    config: LoraConfig,
    *,
    on_unsupported: str = "raise",
    dropout_rng: Any = None,
    deterministic: bool = True,
) -> Callable[..., Any]:
    """Wraps ``fn`` to run on adapted trees, computing each adapted kernel's use factorised.

    Every use of an adapted kernel ``W`` (a product, einsum, convolution or embedding lookup,
    reached through casts, transposes, reshapes, nested ``jit``, ``remat``, ``scan`` over
    stacked layers, ``cond``/``switch``, ``while``, ``custom_jvp``/``custom_vjp`` and
    ``shard_map``) becomes ``x·W + s·((x·A)·B)``; ``W + s·A·B`` is never formed. Arguments
    without adapters, and code that never touches an adapted kernel, run unchanged. The output
    equals ``fn`` on :func:`jlora.merge_params` of the same trees, up to rounding.

    Custom derivative rules of a ``custom_jvp``/``custom_vjp`` function that takes an adapted
    kernel are replaced by autodiff of its body (the rule was written for a dense ``W``).

    Args:
      fn: any function taking parameter trees (e.g. ``model.apply``); it is traced, so its
        array arguments must be JAX-traceable. Non-array leaves are passed through as static.
      config: the config the trees were initialised with (scales and axis roles).
      on_unsupported: ``"raise"`` (default): a use that cannot be factorised is an error
        naming the primitive and the kernel path. ``"merge"``: merge that kernel at that use
        only, with a warning.
      dropout_rng: PRNG key for LoRA dropout (``config.dropout``) on the adapters' input
        (products and convolutions; embedding lookups have none); only used when
        ``deterministic=False``. Pass a new key every step.
      deterministic: ``True`` (default, eval) turns LoRA dropout off; ``False`` (training)
        turns it on when ``config.dropout > 0``. Same key, same masks.

    Returns:
      A function with ``fn``'s signature whose parameter arguments may carry adapters.

    Under ``jax.jit`` (or any transformation) the tracing and interpretation happen once per
    compilation of the caller. Called eagerly, the wrapper jits itself: the first call per
    argument structure (shapes, dtypes, tree, non-array leaves) compiles, later ones reuse it,
    and ``fn``'s Python side effects run only while it is traced. Keep the wrapper and call it
    again rather than wrapping ``fn`` anew each time.

    Raises:
      ValueError: here, for an unknown ``on_unsupported`` or dropout on without a key; when
        called, for a use that cannot be factorised or adapters that do not fit ``config``.
      TypeError: if ``config`` is not a ``LoraConfig`` or ``deterministic`` is not a bool.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jnp.ones((4, 3))}
      >>> cfg = jlora.LoraConfig(rank=2, targets="w")
      >>> p = jlora.init_lora(jax.random.key(0), params, cfg)
      >>> p["w_lora_b"] = jnp.ones((2, 3))
      >>> f = lambda p, x: jnp.tanh(x @ p["w"])
      >>> y = jlora.lora(f, cfg)(p, jnp.ones((5, 4)))
      >>> bool(jnp.allclose(y, f(jlora.merge_params(p, cfg), jnp.ones((5, 4)))))
      True
    """
    dropout = _check_options(config, on_unsupported, dropout_rng, deterministic)

    @compile_eager
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        base_args, base_kwargs, found = _strip(args, kwargs, config)
        if not found:
            return fn(*dequantize(args), **dequantize(kwargs))
        leaves, treedef = jax.tree_util.tree_flatten_with_path(
            (base_args, base_kwargs), is_leaf=is_quantized
        )
        traced = [i for i, (_, leaf) in enumerate(leaves) if is_input(leaf)]

        def flat_fn(*arrays: Any) -> Any:
            values = [leaf for _, leaf in leaves]
            for i, x in zip(traced, arrays, strict=True):
                values[i] = x
            a, k = jax.tree.unflatten(treedef, values)
            return fn(*a, **k)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
            *(_dense_shape(leaves[i][1]) for i in traced)
        )
        inputs = []
        for i in traced:
            path, leaf = leaves[i]
            adapted = found.get(tuple(path))
            if adapted is None:
                # A quantised kernel without adapters is used as a plain dense array.
                inputs.append(leaf.dequantize() if is_quantized(leaf) else leaf)
                continue
            # A QLoRA base stays quantised until the rule that consumes it (see quantized_view).
            w = view(leaf) if is_quantized(leaf) else leaf
            value = LoraValue(
                w, adapted.site.a, adapted.site.b, adapted.roles, adapted.scale, adapted.site.name
            )
            inputs.append(value.with_magnitude(adapted.site.m))
        ctx = Context(on_unsupported, Dropout(dropout.rate, dropout.key))
        outs = concrete(interpret(closed.jaxpr, closed.consts, inputs, ctx), ctx, "output")
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return wrapped


def value_and_grad(
    fn: Callable[..., Any],
    config: LoraConfig,
    *,
    has_aux: bool = False,
    on_unsupported: str = "raise",
    dropout_rng: Any = None,
    deterministic: bool = True,
) -> Callable[..., tuple[Any, Any]]:
    """``jax.value_and_grad`` of ``lora(fn)`` with respect to the adapters of its first argument.

    The first argument is an adapted tree; it is :func:`jlora.split` into ``(lora, base)``, the
    base is held constant and only ``lora`` is differentiated, so no gradient (and, thanks to
    :func:`lora`, no W-sized weight-gradient product) is formed for any base leaf.

    Args:
      fn: a scalar loss ``fn(params, *args, **kwargs)``, or ``(loss, aux)`` with ``has_aux``.
      config: the config the tree was initialised with.
      has_aux: as in ``jax.value_and_grad``.
      on_unsupported: as in :func:`lora`.
      dropout_rng: as in :func:`lora`.
      deterministic: as in :func:`lora` (pass ``False`` in the train step to use dropout).

    Returns:
      A function ``(params, *args, **kwargs) -> (value, grads)`` where ``grads`` is shaped like
      the ``lora`` half of ``split(params)``.

    Raises:
      ValueError: as :func:`lora`, and if ``params`` holds no adapters.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> cfg = jlora.LoraConfig(rank=2, targets="w")
      >>> p = jlora.init_lora(jax.random.key(0), {"w": jnp.ones((4, 3))}, cfg)
      >>> loss = lambda p, x: jnp.sum((x @ p["w"]) ** 2)
      >>> value, grads = jlora.value_and_grad(loss, cfg)(p, jnp.ones((5, 4)))
      >>> sorted(grads)
      ['w_lora_a', 'w_lora_b']
    """
    factorised = lora(
        fn,
        config,
        on_unsupported=on_unsupported,
        dropout_rng=dropout_rng,
        deterministic=deterministic,
    )

    @compile_eager
    def run(params: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        adapters, base = split(params)
        if not jax.tree.leaves(adapters):
            raise ValueError(
                "jlora.value_and_grad: the first argument holds no LoRA adapters; call "
                "jlora.init_lora(key, params, config) first"
            )

        def of_adapters(a: Any) -> Any:
            return factorised(combine(a, base), *args, **kwargs)

        return jax.value_and_grad(of_adapters, has_aux=has_aux)(adapters)

    return run
