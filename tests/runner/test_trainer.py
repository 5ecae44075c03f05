"""The trainer alone: the loop's hooks, cadence, divergence and Ctrl-C, and the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jlora.runner.trainer.hooks import Checkpoint
from jlora.runner.trainer.loop import Diverged, Hook, train
from jlora.runner.trainer.step import accumulated_value_and_grad, make_train_step


class Recorder(Hook):
    def __init__(self, every=1):
        self.every, self.events = every, []

    def observe(self, step, record):
        self.events.append(("observe", step, record["loss"]))

    def run(self, step, state):
        self.events.append(("run", step, state))

    def interrupted(self, step, state):
        self.events.append(("interrupted", step, state))

    def close(self):
        self.events.append(("close",))


def add(state, batch, step):
    return state + batch, (float(batch), True, {"twice": 2.0 * batch})


def test_hooks_run_at_their_cadence_and_after_the_last_step():
    hook = Recorder(every=2)
    assert train(add, 0, lambda s: s, start=0, steps=5, hooks=[hook]) == 15
    runs = [e[1] for e in hook.events if e[0] == "run"]
    assert runs == [2, 4, 5]
    assert [e[1] for e in hook.events if e[0] == "observe"] == [1, 2, 3, 4, 5]
    assert hook.events[-1] == ("close",)


def test_a_resumed_loop_starts_after_its_step():
    hook = Recorder()
    assert train(add, 100, lambda s: s, start=3, steps=4, hooks=[hook]) == 104
    assert [e[1] for e in hook.events if e[0] == "observe"] == [4]


@pytest.mark.parametrize("loss, finite", [(float("nan"), True), (1.0, False)])
def test_a_non_finite_step_raises_diverged_and_hooks_are_closed(loss, finite):
    hook = Recorder()

    def step_fn(state, batch, step):
        return state + 1, ((loss, finite, {}) if step == 3 else (0.5, True, {}))

    with pytest.raises(Diverged, match="training diverged at step 3") as err:
        train(step_fn, 0, lambda s: s, start=0, steps=5, hooks=[hook])
    assert err.value.step == 3 and (err.value.loss != err.value.loss or err.value.loss == 1.0)
    assert ("observe", 3, 0.5) not in hook.events and hook.events[-1] == ("close",)
    assert all(e[1] < 3 for e in hook.events if e[0] == "run")


class FakeStop:
    def __init__(self, at):
        self.at, self.step = at, 0

    @property
    def requested(self):
        self.step += 1
        return self.step >= self.at


def test_ctrl_c_ends_after_the_step_in_flight_and_the_checkpoint_hook_saves_once():
    saved, told = [], []
    checkpoint = Checkpoint(2, lambda step, state: saved.append((step, state)), told.append)
    with pytest.raises(KeyboardInterrupt):
        train(add, 0, lambda s: 1, start=0, steps=10, hooks=[checkpoint], stop=FakeStop(3))
    assert saved == [(2, 2), (3, 3)] and told == [3]
    saved.clear()
    with pytest.raises(KeyboardInterrupt):  # interrupted on a checkpoint step: saved once
        train(add, 0, lambda s: 1, start=0, steps=10, hooks=[checkpoint], stop=FakeStop(2))
    assert saved == [(2, 2)]


def test_accumulated_metrics_are_weighted_like_the_loss():
    def loss_fn(w, base, batch, rng):
        del base, rng
        err = jnp.sum(batch["mask"] * (w - batch["x"]) ** 2) / jnp.sum(batch["mask"])
        return err, {"mean_x": jnp.sum(batch["mask"] * batch["x"]) / jnp.sum(batch["mask"])}

    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    batches = {"x": x, "mask": mask}
    weight = lambda b: jnp.sum(b["mask"])  # noqa: E731
    (loss, metrics), grad = accumulated_value_and_grad(loss_fn, weight)(
        jnp.float32(0.5), None, batches, jax.random.key(0)
    )
    kept = x[mask > 0]
    np.testing.assert_allclose(metrics["mean_x"], kept.mean(), rtol=1e-6)
    np.testing.assert_allclose(loss, np.mean((0.5 - kept) ** 2), rtol=1e-6)
    np.testing.assert_allclose(grad, np.mean(2 * (0.5 - kept)), rtol=1e-6)


def test_the_step_reports_metrics_and_a_non_finite_update():
    def loss_fn(t, base, batch, rng):
        return jnp.sum((t["w"] - batch) ** 2), {"w": t["w"]}

    tx = optax.sgd(0.25)
    state = {"trainable": {"w": jnp.zeros(())}, "rng": jax.random.key(0)}
    state["opt_state"] = tx.init(state["trainable"])
    step = make_train_step(loss_fn, lambda b: 1.0, tx)
    new, (loss, finite, metrics) = step(state, None, jnp.float32(2.0), 1)
    assert float(loss) == 4.0 and bool(finite) and float(metrics["w"]) == 0.0
    assert float(new["trainable"]["w"]) == 1.0
    _, (_, finite, _) = step(state, None, jnp.float32(jnp.inf), 2)
    assert not bool(finite)
