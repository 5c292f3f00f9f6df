"""Tests for sarcoma_jax.optim: momentum_reset against fresh optax optimizers, and its schedules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from sarcoma_jax import optim

_LEARNING_RATE = 1e-2
_INITIAL_PARAMS = jnp.array([1.0, -2.0, 0.5, 3.0], jnp.float32)
_CURVATURE = jnp.array([1.0, 0.3, 2.0, 0.7], jnp.float32)


def _gradient(params: jax.Array) -> jax.Array:
    """Gradient of sum(curvature * params**2 / 2), so it depends on where the optimizer is."""
    return (_CURVATURE * params).astype(params.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _step(opt, params, state):
    updates, state = opt.update(_gradient(params), state, params)
    return optax.apply_updates(params, updates), state, updates


def _find_states(tree, state_type):
    return [
        node
        for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, state_type))
        if isinstance(node, state_type)
    ]


def _resets_through_wrapper(should_reset, num_steps):
    """Steps at which momentum_reset resets, running it for num_steps updates under jit."""
    opt = optim.momentum_reset(optax.sgd(0.0), should_reset)
    params = jnp.zeros([1])

    def one_update(state, _):
        _, new_state = opt.update(jnp.zeros([1]), state, params)
        return new_state, new_state.reset_count > state.reset_count

    _, did_reset = jax.lax.scan(one_update, opt.init(params), length=num_steps)
    return np.flatnonzero(np.asarray(did_reset)).tolist()


class MomentumResetTest(parameterized.TestCase):
    def test_matches_fresh_adam_after_each_reset(self):
        period = 3
        opt = optim.momentum_reset(optax.adam(_LEARNING_RATE, b1=0.5), optim.reset_every(period))
        params, state = _INITIAL_PARAMS, opt.init(_INITIAL_PARAMS)
        for _ in range(3):  # Reset periods; the first starts from a fresh state without a reset.
            reference = optax.adam(_LEARNING_RATE, b1=0.5)
            reference_params, reference_state = params, reference.init(params)
            for _ in range(period):
                params, state, updates = _step(opt, params, state)
                reference_params, reference_state, reference_updates = _step(
                    reference, reference_params, reference_state
                )
                np.testing.assert_allclose(updates, reference_updates, rtol=1e-6, atol=1e-9)
        self.assertEqual(int(state.count), 3 * period)
        self.assertEqual(int(state.reset_count), 2)
        self.assertEqual(int(state.last_reset_step), 2 * period)

    def test_differs_from_adam_without_reset(self):
        """Guards the test above: the reset must change the updates it checks."""
        opt = optim.momentum_reset(optax.adam(_LEARNING_RATE, b1=0.5), optim.reset_every(3))
        plain = optax.adam(_LEARNING_RATE, b1=0.5)
        params, state = _INITIAL_PARAMS, opt.init(_INITIAL_PARAMS)
        plain_params, plain_state = _INITIAL_PARAMS, plain.init(_INITIAL_PARAMS)
        for _ in range(4):
            params, state, updates = _step(opt, params, state)
            plain_params, plain_state, plain_updates = _step(plain, plain_params, plain_state)
        self.assertGreater(float(jnp.max(jnp.abs(updates - plain_updates))), 1e-4)

    def test_first_update_after_reset_is_lr_not_15_lr(self):
        """Zeroing mu and nu but keeping Adam's count would give ~15.8 lr at b1 = 0.5."""
        num_steps = 5000
        gradient = jnp.array([1.0, -2.0, 3.0], jnp.float32)
        params = jnp.zeros([3], jnp.float32)
        opt = optim.momentum_reset(optax.adam(_LEARNING_RATE, b1=0.5), optim.reset_every(num_steps))

        def one_update(state, _):
            return opt.update(gradient, state, params)[1], None

        state, _ = jax.lax.scan(one_update, opt.init(params), length=num_steps)
        updates, state = jax.jit(opt.update)(gradient, state, params)
        self.assertEqual(int(state.reset_count), 1)
        # A fresh Adam's first step is -lr * g / (|g| + eps), by hand.
        expected = -_LEARNING_RATE * np.array([1.0, -1.0, 1.0])
        np.testing.assert_allclose(updates, expected, rtol=1e-5)

        # The mistake, by hand: with mu = nu = 0 and count 5000, mu_hat = (1 - b1) g and
        # nu_hat = (1 - b2) g**2 / (1 - b2**5001), so the step is ~0.5 / sqrt(0.001) = 15.8 lr.
        nu_hat_scale = (1 - 0.999) / (1 - 0.999 ** (num_steps + 1))
        mistaken_step_size = _LEARNING_RATE * 0.5 / np.sqrt(nu_hat_scale)
        self.assertGreater(mistaken_step_size / _LEARNING_RATE, 15.0)
        self.assertLess(float(jnp.max(jnp.abs(updates))), 1.01 * _LEARNING_RATE)

    def test_reset_leaves_params_and_applies_fresh_update(self):
        """A zero gradient at the reset step: a fresh Adam moves nothing, stale momentum would."""
        opt = optim.momentum_reset(optax.adam(_LEARNING_RATE), optim.reset_every(2))
        params, state = _INITIAL_PARAMS, opt.init(_INITIAL_PARAMS)
        for _ in range(2):
            params, state, _ = _step(opt, params, state)
        updates, reset_state = jax.jit(opt.update)(jnp.zeros_like(params), state, params)
        np.testing.assert_array_equal(updates, np.zeros(4))
        self.assertEqual(int(reset_state.reset_count), 1)
        stale_updates, _ = optax.adam(_LEARNING_RATE).update(
            jnp.zeros_like(params), state.inner_state, params
        )
        self.assertGreater(float(jnp.max(jnp.abs(stale_updates))), 1e-4)

    def test_jit_compiles_once(self):
        opt = optim.momentum_reset(optax.adam(_LEARNING_RATE), optim.reset_every(2))
        num_traces = []

        @jax.jit
        def step(params, state):
            num_traces.append(1)
            updates, state = opt.update(_gradient(params), state, params)
            return optax.apply_updates(params, updates), state

        params, state = _INITIAL_PARAMS, opt.init(_INITIAL_PARAMS)
        for _ in range(5):
            params, state = step(params, state)
        self.assertLen(num_traces, 1)
        self.assertEqual(int(state.reset_count), 2)

    def test_inside_inject_hyperparams(self):
        def factory(learning_rate):
            return optim.momentum_reset(optax.adam(learning_rate, b1=0.5), optim.reset_every(2))

        injected = optax.inject_hyperparams(factory)(learning_rate=_LEARNING_RATE)
        direct = factory(_LEARNING_RATE)
        params, state = _INITIAL_PARAMS, injected.init(_INITIAL_PARAMS)
        direct_params, direct_state = _INITIAL_PARAMS, direct.init(_INITIAL_PARAMS)
        for _ in range(5):
            params, state, updates = _step(injected, params, state)
            direct_params, direct_state, direct_updates = _step(direct, direct_params, direct_state)
            np.testing.assert_allclose(updates, direct_updates, rtol=1e-6)
        self.assertEqual(int(state.inner_state.reset_count), 2)

    @parameterized.parameters(jnp.float32, jnp.bfloat16)
    def test_keeps_dtypes(self, dtype):
        opt = optim.momentum_reset(optax.adam(_LEARNING_RATE), optim.reset_every(2))
        params = _INITIAL_PARAMS.astype(dtype)
        state = jax.jit(opt.init)(params)
        initial_dtypes = jax.tree.map(lambda x: x.dtype, state)
        for _ in range(3):
            params, state, updates = _step(opt, params, state)
            self.assertEqual(updates.dtype, dtype)
            self.assertEqual(params.dtype, dtype)
            self.assertEqual(jax.tree.map(lambda x: x.dtype, state), initial_dtypes)
        adam_state = _find_states(state, optax.ScaleByAdamState)[0]
        self.assertEqual(adam_state.mu.dtype, dtype)
        self.assertEqual(adam_state.nu.dtype, dtype)
        self.assertEqual(int(state.reset_count), 1)

    @parameterized.parameters(jnp.float32, jnp.bfloat16)
    def test_wrapped_in_multisteps(self, dtype):
        """MultiSteps(momentum_reset(adam)) == momentum_reset(adam) on the averaged gradients."""
        every_k = 3
        gradients = jax.random.normal(jax.random.key(0), [4 * every_k, 4]).astype(dtype)
        params = _INITIAL_PARAMS.astype(dtype)

        def inner():
            return optim.momentum_reset(optax.adam(_LEARNING_RATE), lambda step: step % 2 == 1)

        accumulated = optax.MultiSteps(inner(), every_k_schedule=every_k)
        state = accumulated.init(params)
        update = jax.jit(accumulated.update)
        for gradient in gradients:
            updates, state = update(gradient, state, params)
            self.assertEqual(updates.dtype, dtype)
            params = optax.apply_updates(params, updates)

        reference = inner()
        reference_params = _INITIAL_PARAMS.astype(dtype)
        reference_state = reference.init(reference_params)
        for mean_gradient in gradients.astype(jnp.float32).reshape(4, every_k, 4).mean(axis=1):
            updates, reference_state = reference.update(
                mean_gradient.astype(dtype), reference_state, reference_params
            )
            reference_params = optax.apply_updates(reference_params, updates)
        tolerance = 1e-6 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(
            params.astype(jnp.float32), reference_params.astype(jnp.float32), rtol=tolerance
        )
        self.assertEqual(int(state.inner_opt_state.count), 4)
        self.assertEqual(int(state.inner_opt_state.reset_count), 2)  # Before updates 1 and 3.

    def test_wrapping_multisteps_keeps_accumulated_gradients(self):
        """A reset mid-accumulation restarts Adam but keeps the gradients accumulated so far."""
        accumulated = optax.MultiSteps(optax.adam(_LEARNING_RATE), every_k_schedule=2)
        opt = optim.momentum_reset(accumulated.gradient_transformation(), lambda step: step == 3)
        gradients = jnp.array([[1.0, 2.0], [3.0, -4.0], [0.5, 0.5], [-1.5, 0.5]], jnp.float32)
        params = jnp.zeros([2], jnp.float32)
        state = opt.init(params)
        for gradient in gradients:
            updates, state = jax.jit(opt.update)(gradient, state, params)
        # Call 3 completes the second accumulation with a fresh Adam: -lr * mean / |mean|.
        mean_gradient = np.array([-0.5, 0.5])
        np.testing.assert_allclose(updates, -_LEARNING_RATE * np.sign(mean_gradient), rtol=1e-5)
        self.assertEqual(int(state.reset_count), 1)
        self.assertEqual(int(state.inner_state.gradient_step), 2)  # Kept across the reset.

    @parameterized.named_parameters(("schedule_keeps_counting", False, 5), ("restarts", True, 2))
    def test_learning_rate_schedule_counter(self, reset_schedule, expected_count):
        schedule = optax.linear_schedule(_LEARNING_RATE, 0.0, transition_steps=10)
        opt = optim.momentum_reset(
            optax.adam(schedule), optim.reset_every(3), reset_schedule=reset_schedule
        )
        params, state = _INITIAL_PARAMS, opt.init(_INITIAL_PARAMS)
        for step in range(5):
            gradient = _gradient(params)
            params, state, updates = _step(opt, params, state)
            if step == 3:  # First update after the reset: -lr(t) * g / (|g| + eps), by hand.
                schedule_step = 0 if reset_schedule else 3
                learning_rate = _LEARNING_RATE * (1 - schedule_step / 10)
                expected = -learning_rate * np.sign(np.asarray(gradient))
                np.testing.assert_allclose(updates, expected, rtol=1e-5)
        (schedule_state,) = _find_states(state, optax.ScaleByScheduleState)
        self.assertEqual(int(schedule_state.count), expected_count)
        (adam_state,) = _find_states(state, optax.ScaleByAdamState)
        self.assertEqual(int(adam_state.count), 2)

    def test_keeps_inject_hyperparams_counter_and_values(self):
        schedule = optax.linear_schedule(_LEARNING_RATE, 0.0, transition_steps=10)
        inner = optax.inject_hyperparams(optax.adam)(learning_rate=schedule, b1=0.9)
        opt = optim.momentum_reset(inner, optim.reset_every(3))
        params, state = _INITIAL_PARAMS, opt.init(_INITIAL_PARAMS)
        state.inner_state.hyperparams["b1"] = jnp.asarray(0.5)  # Set by hand, as users do.
        for _ in range(5):
            params, state, _ = _step(opt, params, state)
        self.assertEqual(int(state.inner_state.count), 5)
        self.assertEqual(float(state.inner_state.hyperparams["b1"]), 0.5)
        self.assertEqual(int(state.inner_state.inner_state[0].count), 2)

    def test_update_without_params_raises(self):
        opt = optim.momentum_reset(optax.adam(_LEARNING_RATE), optim.reset_every(2))
        with self.assertRaisesRegex(ValueError, "needs params"):
            opt.update(_INITIAL_PARAMS, opt.init(_INITIAL_PARAMS))


class ScheduleTest(parameterized.TestCase):
    def _stateless_resets(self, should_reset, num_steps):
        steps = jnp.arange(num_steps, dtype=jnp.int32)
        flags = jax.jit(jax.vmap(should_reset, in_axes=(0, None)))(steps, jnp.int32(0))
        return np.flatnonzero(np.asarray(flags)).tolist()

    def test_reset_every(self):
        self.assertEqual(self._stateless_resets(optim.reset_every(3), 11), [3, 6, 9])
        self.assertEqual(_resets_through_wrapper(optim.reset_every(3), 11), [3, 6, 9])

    @parameterized.named_parameters(
        # Discriminator CT->PT: 100 initial steps, then cycles of k_d = 50.
        ("disc_after_initial_steps", 100, 50, 260, [100, 150, 200, 250]),
        # T2->PT discriminator: no initial steps, k_d = 100.
        ("disc_without_initial_steps", 0, 100, 350, [100, 200, 300]),
        # Target map: cycles of k_t = 20.
        ("target", 0, 20, 65, [20, 40, 60]),
    )
    def test_reset_at_cycle_starts(self, initial_steps, steps_per_cycle, num_steps, expected):
        should_reset = optim.reset_at_cycle_starts(initial_steps, steps_per_cycle)
        self.assertEqual(self._stateless_resets(should_reset, num_steps), expected)
        self.assertEqual(_resets_through_wrapper(should_reset, num_steps), expected)

    @parameterized.named_parameters(
        ("every_step", 3, 0, 1, 11, [3, 6, 9]),
        ("t2_ct_target", 200, 0, 20, 450, [200, 400]),
        ("not_a_multiple_of_the_cycle", 50, 0, 20, 200, [60, 120, 180]),
        ("after_initial_steps", 50, 10, 20, 200, [50, 110, 170]),
    )
    def test_reset_after_at_least(
        self, min_steps, initial_steps, steps_per_cycle, num_steps, expected
    ):
        should_reset = optim.reset_after_at_least(min_steps, initial_steps, steps_per_cycle)
        self.assertEqual(_resets_through_wrapper(should_reset, num_steps), expected)

    def test_rejects_bad_arguments(self):
        with self.assertRaises(ValueError):
            optim.reset_every(0)
        with self.assertRaises(ValueError):
            optim.reset_at_cycle_starts(-1, 20)
        with self.assertRaises(ValueError):
            optim.reset_after_at_least(10, 0, 0)


if __name__ == "__main__":
    absltest.main()
