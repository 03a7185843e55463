"""The diffusion schedule, forward process and posterior against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffseg.diffusion import (
    GaussianDiffusion,
    Prediction,
    Variance,
    logits_to_x0,
    mask_to_x0,
    x0_to_logits,
    x0_to_mask_logits,
)


def test_five_step_schedule_matches_design():
    d = GaussianDiffusion.linear(num_timesteps=1000, num_steps=5)
    np.testing.assert_array_equal(d.timesteps, [1, 251, 500, 750, 1000])
    np.testing.assert_allclose(d.alphas_cumprod, [0.9999, 0.5214, 0.07859, 0.003351, 4.036e-5], rtol=2e-4)
    assert d.betas.dtype == np.float64 and d.alphas_cumprod.dtype == np.float64
    # beta_k = 1 - abar_k / abar_{k-1}, abar_{-1} = 1
    np.testing.assert_allclose(d.betas[0], 1e-4)
    np.testing.assert_allclose(d.betas[1:], 1 - d.alphas_cumprod[1:] / d.alphas_cumprod[:-1])


def test_full_schedule_is_the_original_linear_schedule():
    d = GaussianDiffusion.linear(num_timesteps=1000, num_steps=1000)
    np.testing.assert_array_equal(d.timesteps, np.arange(1, 1001))
    np.testing.assert_allclose(d.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-9, atol=1e-12)


def test_posterior_coefficients_match_bayes_rule():
    """q(x_{k-1} | x_k, x0) computed from the two Gaussians by hand, for every k > 0."""
    d = GaussianDiffusion.linear(num_steps=5)
    for k in range(1, 5):
        abar_prev, alpha, beta = d.alphas_cumprod[k - 1], 1 - d.betas[k], d.betas[k]
        # prior x_{k-1} ~ N(sqrt(abar_prev) x0, 1 - abar_prev); likelihood x_k ~ N(sqrt(alpha) x_{k-1}, beta)
        precision = 1 / (1 - abar_prev) + alpha / beta
        var = 1 / precision
        coef_x0 = var * np.sqrt(abar_prev) / (1 - abar_prev)
        coef_xt = var * np.sqrt(alpha) / beta
        np.testing.assert_allclose(d.posterior_variance[k], var, rtol=1e-10)
        np.testing.assert_allclose(d.posterior_mean_coef1[k], coef_x0, rtol=1e-10)
        np.testing.assert_allclose(d.posterior_mean_coef2[k], coef_xt, rtol=1e-10)
    # At k = 0 the posterior is x0 itself: no variance, no x_t term.
    assert d.posterior_variance[0] == 0 and d.posterior_mean_coef2[0] == 0
    np.testing.assert_allclose(d.posterior_mean_coef1[0], 1.0)


def test_hand_computed_k2_coefficients():
    d = GaussianDiffusion.linear(num_steps=5)
    a1, a2 = d.alphas_cumprod[1], d.alphas_cumprod[2]
    beta2 = 1 - a2 / a1
    np.testing.assert_allclose(d.posterior_mean_coef1[2], np.sqrt(a1) * beta2 / (1 - a2))
    np.testing.assert_allclose(d.posterior_mean_coef2[2], np.sqrt(1 - beta2) * (1 - a1) / (1 - a2))


def test_q_sample_and_eps_round_trip():
    d = GaussianDiffusion.linear(num_steps=5)
    key = jax.random.PRNGKey(0)
    labels = jax.random.randint(key, (4, 6, 5), 0, 3)
    x0 = mask_to_x0(labels, 3)
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    k = jnp.array([0, 1, 3, 4])
    x_t = d.q_sample(x0, k, noise)
    # at k=4, 1/sqrt(abar)=157 amplifies float32 rounding
    np.testing.assert_allclose(d.x0_from_eps(x_t, k, noise), x0, atol=2e-3)
    np.testing.assert_allclose(d.eps_from_x0(x_t, k, x0), noise, atol=1e-4)
    # hand value for one voxel
    abar = d.alphas_cumprod[3]
    expected = np.sqrt(abar) * x0[2, 0, 0] + np.sqrt(1 - abar) * noise[2, 0, 0]
    np.testing.assert_allclose(x_t[2, 0, 0], expected, rtol=1e-5)


def test_mask_and_logit_conversions():
    x0 = mask_to_x0(jnp.array([[0, 2]]), 3)
    np.testing.assert_array_equal(x0, [[[1, -1, -1], [-1, -1, 1]]])
    logits = jnp.array([[0.0, 1.0, -2.0]])
    p = jax.nn.softmax(logits)
    np.testing.assert_allclose(logits_to_x0(logits), 2 * p - 1, rtol=1e-6)
    np.testing.assert_allclose(jax.nn.softmax(x0_to_logits(logits_to_x0(logits))), p, rtol=1e-5)


def test_posterior_step_has_no_noise_at_last_step():
    d = GaussianDiffusion.linear(num_steps=5)
    x0 = jnp.ones((2, 3, 2))
    x_t = jnp.zeros((2, 3, 2))
    k = jnp.zeros((2,), jnp.int32)
    out = d.p_sample_step(x0, x_t, k, noise=100 * jnp.ones_like(x0))
    np.testing.assert_allclose(out, x0)


@pytest.mark.parametrize("prediction", ["x0", "epsilon"])
def test_sampling_with_an_oracle_recovers_the_mask(prediction):
    d = GaussianDiffusion.linear(num_steps=5)
    labels = jax.random.randint(jax.random.PRNGKey(3), (2, 8, 8), 0, 4)
    x0 = mask_to_x0(labels, 4)
    seen_t = []

    def oracle(x_t, t):
        seen_t.append(t)
        if prediction == "x0":
            return 10.0 * x0  # logits peaked at the true class
        k = jnp.searchsorted(jnp.asarray(d.timesteps), t)
        return d.eps_from_x0(x_t, k, x0)

    logits = jax.jit(lambda key: d.sample(oracle, x0.shape, key, prediction=prediction))(
        jax.random.PRNGKey(0)
    )
    assert logits.shape == x0.shape
    np.testing.assert_array_equal(jnp.argmax(logits, -1), labels)


def test_sampling_feeds_original_timesteps_in_descending_order():
    d = GaussianDiffusion.linear(num_steps=5)
    calls = []

    def record(x_t, t):
        jax.debug.callback(lambda v: calls.append(int(v[0])), t)
        return jnp.zeros_like(x_t)

    jax.block_until_ready(d.sample(record, (1, 2, 2), jax.random.PRNGKey(0)))
    assert calls == [1000, 750, 500, 251, 1]


def test_bad_step_count():
    with pytest.raises(ValueError, match="num_steps"):
        GaussianDiffusion.linear(num_timesteps=10, num_steps=11)


def test_sampling_variance_switch():
    """fixed_large (the reference code) samples with beta_k; beta_tilde (the paper's text) with
    the posterior variance; neither adds noise on the last step."""
    large = GaussianDiffusion.linear(num_steps=5)
    tilde = GaussianDiffusion.linear(num_steps=5, variance="beta_tilde")
    assert large.variance == "fixed_large" and tilde.variance == "beta_tilde"
    np.testing.assert_allclose(large.sampling_variance[1:], large.betas[1:], rtol=1e-12)
    np.testing.assert_allclose(tilde.sampling_variance[1:], tilde.posterior_variance[1:], rtol=1e-12)
    assert large.sampling_variance[0] == 0 and tilde.sampling_variance[0] == 0
    # beta~_k < beta_k: the paper's reading samples with less noise.
    assert np.all(tilde.sampling_variance[1:] < large.sampling_variance[1:])
    x0 = jnp.zeros((1, 4, 2))
    x_t = jnp.ones((1, 4, 2))
    noise = jnp.ones((1, 4, 2))
    k = jnp.array([2])
    mean = large.q_posterior_mean(x0, x_t, k)
    np.testing.assert_allclose(
        large.p_sample_step(x0, x_t, k, noise) - mean, np.sqrt(large.betas[2]), rtol=1e-6
    )
    cfg = {"num_timesteps": 1000, "train_steps": 5, "beta_start": 1e-4, "beta_end": 0.02}
    assert GaussianDiffusion.from_config({**cfg, "variance": "beta_tilde"}).variance == "beta_tilde"
    assert GaussianDiffusion.from_config(cfg).variance == "fixed_large"
    with pytest.raises(ValueError, match="variance"):
        GaussianDiffusion.linear(variance="learned")


def test_epsilon_x0_is_unclipped_by_default_and_clipped_on_request():
    """The reference's ``x_limit: 0``: the x0 read from a noise prediction keeps its value."""
    d = GaussianDiffusion.linear(num_steps=5)
    x_t = jnp.full((1, 2, 3), 0.5)
    eps = jnp.full((1, 2, 3), -1.0)
    k = jnp.array([4])  # abar = 4.04e-5: x0 = (0.5 + 1.0 * sqrt(1 - abar)) / sqrt(abar) ~ 236
    expected = (0.5 + np.sqrt(1 - d.alphas_cumprod[4])) / np.sqrt(d.alphas_cumprod[4])
    np.testing.assert_allclose(d.predict_x0(eps, x_t, k, "epsilon"), expected, rtol=1e-5)
    clipped = GaussianDiffusion.from_config(
        {"num_timesteps": 1000, "train_steps": 5, "beta_start": 1e-4, "beta_end": 0.02, "x0_limit": 1.0}
    )
    np.testing.assert_array_equal(clipped.predict_x0(eps, x_t, k, "epsilon"), 1.0)


def test_logits_of_a_derived_x0_floor_at_the_reference_eps():
    d = GaussianDiffusion.linear()
    x0 = jnp.array([[-1.0, 1.0, -3.0]])  # probabilities 0, 1 and (unclipped epsilon x0) -1
    logits = d.to_logits(jnp.zeros_like(x0), x0, "epsilon")
    np.testing.assert_allclose(logits, [[np.log(1e-5), 0.0, np.log(1e-5)]], rtol=1e-6)
    assert d.to_logits(x0, x0, "x0") is x0  # the network's own logits pass through
    np.testing.assert_allclose(x0_to_logits(jnp.array([-1.0])), [np.log(1e-5)], rtol=1e-6)


# The four voxels: x0_hat above 1 in two classes (0 and 1, 1 and 2) and one inside [-1, 1].
FIXED_X0 = np.array([[1.6, 1.3, -1.0], [1.2, 1.9, -1.0], [-1.0, 1.1, 1.4], [0.2, 0.5, -0.3]], np.float32)


def fixed_x0_denoiser(d: GaussianDiffusion, x0: jax.Array):
    """A noise predictor whose x0_hat is ``x0`` at every step: ``eps_from_x0(x_t, k, x0)``."""

    def denoise(x_t, t):
        k = jnp.searchsorted(jnp.asarray(d.timesteps), t)  # t_k back to the position k
        return d.eps_from_x0(x_t, k, x0)

    return denoise


def test_epsilon_mask_is_the_argmax_of_the_unclipped_x0():
    """The reference's mask is the argmax of the last x0_hat itself; the loss's logits
    (``to_logits``, clipped at 1) would tie the classes above 1 and give 0, 0, 1, 1."""
    d = GaussianDiffusion.linear(num_timesteps=1001, num_steps=5)
    x0 = jnp.asarray(FIXED_X0)[None]  # (1, 4 voxels, 3 classes)
    np.testing.assert_array_equal(np.argmax(x0_to_logits(x0), -1), [[0, 0, 1, 1]])  # the old rule
    for key in range(3):
        logits = jax.jit(lambda key: d.sample(fixed_x0_denoiser(d, x0), x0.shape, key, "epsilon"))(
            jax.random.PRNGKey(key)
        )
        np.testing.assert_array_equal(np.argmax(logits, -1), [[0, 1, 2, 1]])
        np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(FIXED_X0, -1)[None])
        # softmax: (x0_hat + 1) / 2 normalised, the class at -1 (p = 0) next to nothing
        p = np.clip((FIXED_X0 + 1) / 2, 0, None)
        np.testing.assert_allclose(jax.nn.softmax(logits, -1)[0], p / p.sum(-1, keepdims=True), atol=1e-5)


def test_mask_logits_are_strictly_increasing_in_x0():
    """``x0_to_mask_logits`` keeps the order of x0_hat everywhere, below -1 and above 1 too, is
    ``log((x0 + 1) / 2)`` above the floor and continuous at it."""
    x = np.linspace(-6.0, 6.0, 20001, dtype=np.float32)  # steps of 6e-4
    s = np.asarray(x0_to_mask_logits(jnp.asarray(x)))
    assert np.all(np.diff(s) > 0) and np.all(np.isfinite(s))
    above = (x + 1) / 2 >= 1e-5
    np.testing.assert_allclose(s[above], np.log((x[above] + 1) / 2), rtol=1e-6)
    # p = 1e-5 (float32 puts the x0 within 6e-8 of it) and the line 1e-6 below it: log(1e-5) - 0.1
    near = x0_to_mask_logits(jnp.asarray([2e-5 - 1, 1.8e-5 - 1], jnp.float32))
    np.testing.assert_allclose(near, [np.log(1e-5), np.log(1e-5) - 0.1], atol=1e-2)
    # random unbounded x0_hat, with voxels whose classes are all below -1: argmax kept
    x0 = 4.0 * jax.random.normal(jax.random.PRNGKey(0), (4096, 5)) - 2.0
    assert np.any(np.all(np.asarray(x0) < -1, axis=-1))
    np.testing.assert_array_equal(np.argmax(x0_to_mask_logits(x0), -1), np.argmax(x0, -1))


def test_x0_runs_return_the_networks_last_logits_bit_for_bit():
    """A predicted x0's mask logits are the network's own output of the last step, unchanged."""
    d = GaussianDiffusion.linear(num_steps=5)
    logits = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 5, 4))
    out = d.sample(
        lambda x_t, t: logits + 0.1 * (t[:, None, None, None] > 1), logits.shape, jax.random.PRNGKey(0)
    )
    np.testing.assert_array_equal(out, logits)
    assert d.mask_logits(logits, logits_to_x0(logits), "x0") is logits


# -- training: its noisy input (with recycling) and its loss terms ------------------------------


def test_prediction_and_variance_names_are_checked_in_the_enums():
    assert Prediction("epsilon") is Prediction.EPSILON and Prediction.X0 == "x0"
    assert Variance("beta_tilde") is Variance.BETA_TILDE
    with pytest.raises(ValueError, match=r"prediction must be one of \('x0', 'epsilon'\), got 'noise'"):
        Prediction("noise")
    with pytest.raises(ValueError, match="prediction must be one of"):
        GaussianDiffusion.linear().predict_x0(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.array([0]), "v")
    from diffseg.runconfig import RUN_CHOICES  # the config's own check names the same values

    assert RUN_CHOICES[("diffusion", "prediction")] == tuple(Prediction)
    assert RUN_CHOICES[("diffusion", "variance")] == tuple(Variance)


def test_sqrt_coefficients_are_float64_and_precomputed():
    d = GaussianDiffusion.linear(num_steps=5)
    assert d.sqrt_alphas_cumprod.dtype == np.float64
    np.testing.assert_array_equal(d.sqrt_alphas_cumprod, np.sqrt(d.alphas_cumprod))
    np.testing.assert_array_equal(d.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - d.alphas_cumprod))
    np.testing.assert_array_equal(d.sampling_std, np.sqrt(d.sampling_variance))


def test_training_input_without_recycling_is_q_sample_by_hand():
    d = GaussianDiffusion.linear(num_timesteps=1000, num_steps=5)
    x0 = mask_to_x0(jnp.array([[0, 1], [2, 1]]), 3)  # (2, 2, 3)
    noise = jnp.full(x0.shape, 0.5)
    k = jnp.array([1, 3])
    x_t = d.training_input(x0, k, noise)
    for b in range(2):
        abar = d.alphas_cumprod[int(k[b])]
        expected = np.sqrt(abar) * np.asarray(x0[b]) + np.sqrt(1 - abar) * 0.5
        np.testing.assert_allclose(x_t[b], expected, rtol=1e-6)
    # k = 1 is t = 251: abar = 0.5214 (the five-step schedule above)
    np.testing.assert_allclose(x_t[0, 0, 0], np.sqrt(0.5214) * 1 + np.sqrt(1 - 0.5214) * 0.5, rtol=2e-4)


def test_recycling_noises_the_models_stopped_prediction_one_step_further():
    """x_k = q_sample(x0_hat, k), x0_hat the model's output on x0 noised to k + 1 (K - 1 stays),
    and no gradient flows through that first pass."""
    d = GaussianDiffusion.linear(num_timesteps=1000, num_steps=5)
    x0 = mask_to_x0(jnp.array([[0, 1], [2, 0]]), 3)
    first, noise = jnp.full(x0.shape, -0.3), jnp.full(x0.shape, 0.2)
    k = jnp.array([0, 4])
    seen = {}

    def denoise(w, x, t):  # "logits" w * x: x0_hat = 2 softmax(w x) - 1
        seen["t"] = t
        return w * x

    def recycled(w):
        return d.training_input(x0, k, noise, recycle=(lambda x, t: denoise(w, x, t), first))

    x_t = recycled(2.0)
    np.testing.assert_array_equal(seen["t"], [251, 1000])  # k + 1 = 1, and the last step stays
    k_next = np.array([1, 4])
    for b in range(2):
        a_next, a = d.alphas_cumprod[k_next[b]], d.alphas_cumprod[int(k[b])]
        x_next = np.sqrt(a_next) * np.asarray(x0[b]) + np.sqrt(1 - a_next) * -0.3
        x0_hat = 2 * np.asarray(jax.nn.softmax(2.0 * x_next, axis=-1)) - 1
        np.testing.assert_allclose(x_t[b], np.sqrt(a) * x0_hat + np.sqrt(1 - a) * 0.2, rtol=1e-5, atol=1e-6)
    assert float(jax.grad(lambda w: jnp.sum(recycled(w)))(2.0)) == 0.0  # stop-gradient
    np.testing.assert_array_equal(d.recycled_x0(lambda x, t: denoise(2.0, x, t), x0, k, first, "x0"),
                                  logits_to_x0(2.0 * d.q_sample(x0, jnp.array([1, 4]), first)))  # fmt: skip


def test_training_loss_by_prediction():
    """x0: the segmentation loss of the output; epsilon: of the logits of the implied x0_hat, plus
    the weighted L2 to the drawn noise."""
    d = GaussianDiffusion.linear(num_timesteps=1000, num_steps=5)
    x_t, noise = jnp.full((1, 2, 3), 0.4), jnp.full((1, 2, 3), 0.1)
    output, k = jnp.full((1, 2, 3), 0.3), jnp.array([2])
    seg = lambda logits: jnp.sum(logits)  # noqa: E731 - a stand-in that shows what it was given
    assert float(d.training_loss(output, x_t, k, noise, "x0", seg, 0.1)) == float(jnp.sum(output))
    abar = d.alphas_cumprod[2]
    x0_hat = (0.4 - np.sqrt(1 - abar) * 0.3) / np.sqrt(abar)
    expected = 6 * np.log(max((x0_hat + 1) / 2, 1e-5)) + 0.1 * (0.3 - 0.1) ** 2
    loss = d.training_loss(output, x_t, k, noise, Prediction.EPSILON, seg, 0.1)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
