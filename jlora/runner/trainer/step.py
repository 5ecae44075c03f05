"""The jitted train step: an objective's gradient (accumulated over micro-batches), the update.

An objective is ``loss(trainable, base, batch, rng) -> (loss, metrics)`` with
``batch_weight(batch)`` (see :mod:`jlora.runner.objectives`); only ``trainable`` is
differentiated. The step is the same for every objective.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def accumulated_value_and_grad(loss_fn: LossFn, weight_fn: Callable[[Any], Any]) -> Any:
    """``(trainable, base, batches, rng) -> ((loss, metrics), grads)`` over stacked micro-batches.

    ``batches`` stacks ``k`` micro-batches on a leading axis (every leaf of a tuple or dict
    batch); ``lax.scan`` runs one at a time, so memory is one micro-batch's. Micro-batch ``j``
    draws dropout from ``fold_in(rng, j)`` and counts ``w_j = weight_fn(batch_j)`` (the tokens
    or examples its mean loss averages over), and the result is ``Σ w_j·loss_j / Σ w_j`` and
    the same mean of the metrics and gradients: the loss and gradient of the ``k``
    micro-batches concatenated, whatever each one holds.

    Example:
      >>> import jax.numpy as jnp
      >>> def loss(w, base, batch, rng):
      ...     return jnp.mean((w * batch) ** 2), {}
      >>> run = accumulated_value_and_grad(loss, lambda b: b.size)
      >>> (value, _), grad = run(1.0, None, jnp.ones((2, 3)), jax.random.key(0))
      >>> float(value), float(grad)
      (1.0, 2.0)
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def run(trainable: Any, base: Any, batches: Any, rng: jax.Array) -> tuple[Any, Any]:
        k = jax.tree.leaves(batches)[0].shape[0]
        shapes = jax.eval_shape(
            loss_fn, trainable, base, jax.tree.map(lambda x: x[0], batches), rng
        )

        def body(carry: Any, xs: Any) -> tuple[Any, None]:
            j, batch = xs
            (loss, metrics), grads = grad_fn(trainable, base, batch, jax.random.fold_in(rng, j))
            w = jnp.asarray(weight_fn(batch), jnp.float32)
            total, sums, weights = carry

            def add(s: Any, x: Any) -> Any:
                return jax.tree.map(lambda a, b: a + w * b.astype(a.dtype), s, x)

            return (add(total, (loss, metrics)), add(sums, grads), weights + w), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        first = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
        f32 = jnp.zeros((), jnp.float32)
        (total, sums, weights), _ = jax.lax.scan(
            body, (first, zeros, f32), (jnp.arange(k), batches)
        )
        weights = jnp.where(weights > 0, weights, 1.0)  # nothing to learn: zero update
        mean = jax.tree.map(lambda t: t / weights, total)
        return mean, jax.tree.map(lambda g: (g / weights).astype(g.dtype), sums)

    return run


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating leaf of ``tree`` is finite (a traced bool).

    Example:
      >>> bool(all_finite({"a": jnp.ones(2), "n": jnp.arange(2)}))
      True
    """
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.array([jnp.isfinite(x).all() for x in leaves]))


def make_train_step(
    loss_fn: LossFn,
    weight_fn: Callable[[Any], Any],
    tx: optax.GradientTransformation,
    grad_accum: int = 1,
    **jit_options: Any,
) -> Any:
    """The jitted step ``(state, base, batch, step) -> (state, (loss, finite, metrics))``.

    ``state`` is ``{"trainable", "opt_state", "rng"}``; step ``s`` draws its dropout key as
    ``fold_in(rng, s)``. With ``grad_accum > 1`` the batch stacks that many micro-batches
    (:func:`accumulated_value_and_grad`). ``finite`` says the updated trainable leaves and
    optimizer state hold only finite values.

    Example:
      >>> import optax
      >>> def loss(t, base, batch, rng):
      ...     return jnp.sum((t["w"] - batch) ** 2), {"w": t["w"]}
      >>> tx = optax.sgd(0.25)
      >>> state = {"trainable": {"w": jnp.zeros(())}, "rng": jax.random.key(0)}
      >>> state["opt_state"] = tx.init(state["trainable"])
      >>> step = make_train_step(loss, lambda b: 1.0, tx)
      >>> state, (value, finite, metrics) = step(state, None, jnp.float32(2.0), 1)
      >>> float(value), bool(finite), float(state["trainable"]["w"])
      (4.0, True, 1.0)
    """

    @partial(jax.jit, **jit_options)
    def step_fn(
        state: dict[str, Any], base: Any, batch: Any, step: jax.Array
    ) -> tuple[dict[str, Any], Any]:
        rng = jax.random.fold_in(state["rng"], step)  # a new dropout key every step
        if grad_accum > 1:
            (loss, metrics), grads = accumulated_value_and_grad(loss_fn, weight_fn)(
                state["trainable"], base, batch, rng
            )
        else:
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["trainable"], base, batch, rng
            )
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        new = {"trainable": trainable, "opt_state": opt_state, "rng": state["rng"]}
        return new, (loss, all_finite((trainable, opt_state)), metrics)

    return step_fn
