"""Gaussian diffusion over segmentation masks: the only place the diffusion math is written.

Coefficients are computed once, in float64 numpy, for the K-step resampled schedule
(Nichol & Dhariwal 2021; paper section 3.1) and indexed by the position ``k = 0..K-1``
(``k = 0`` is ``t = 1``, the least noisy step). Training (its noisy input with or without
recycling, :meth:`GaussianDiffusion.training_input`; the terms of its loss that depend on what
the network predicts, :meth:`GaussianDiffusion.training_loss`) and sampling (posterior steps)
both call these methods, so no formula is written twice. Training keeps the randomness (which
key draws which noise) and the segmentation loss (cross-entropy, Dice).

What the network predicts (:class:`Prediction`) and the sampling variance (:class:`Variance`)
are enums; a name from a run config becomes one through the enum's constructor, which is where
an unknown name is refused.

Shapes: masks are ``(batch, *spatial, classes)``; ``k`` is an int array ``(batch,)`` that is
broadcast over the trailing axes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from diffseg.runconfig import DiffusionConfig, as_section


class _Choice(StrEnum):
    """A config value with a closed set of names; members compare equal to their names."""

    @classmethod
    def _missing_(cls, value: object) -> NoReturn:
        names = tuple(member.value for member in cls)
        raise ValueError(f"{cls.__name__.lower()} must be one of {names}, got {value!r}")


class Prediction(_Choice):
    """What the network outputs: the mask's logits (``x0``) or the noise of its input (``epsilon``)."""

    X0 = "x0"
    EPSILON = "epsilon"


class Variance(_Choice):
    """The sampling variance: ``beta_k`` (``fixed_large``, the reference code) or the posterior's
    ``beta~_k`` (``beta_tilde``, the paper's text)."""

    FIXED_LARGE = "fixed_large"
    BETA_TILDE = "beta_tilde"


# The floor of the probabilities (x0 + 1) / 2 before their log (``x0_to_logits``): the reference's
# ``EPS`` (1e-5), the run config's diffusion.log_eps default. It bounds the epsilon run's per-voxel
# cross-entropy at -log(1e-5) = 11.5.
LOG_EPS: float = DiffusionConfig.log_eps


def mask_to_x0(labels: jax.Array, num_classes: int) -> jax.Array:
    """Label map ``(batch, *spatial)`` int -> ``x0 = 2*onehot - 1`` ``(batch, *spatial, classes)``."""
    return 2.0 * jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) - 1.0


def logits_to_x0(logits: jax.Array) -> jax.Array:
    """Network logits ``(..., classes)`` -> predicted mask ``x0_hat = 2*softmax - 1`` in [-1, 1]."""
    return 2.0 * jax.nn.softmax(logits.astype(jnp.float32), axis=-1) - 1.0


def x0_to_logits(x0: jax.Array, eps: float = LOG_EPS) -> jax.Array:
    """Inverse of :func:`logits_to_x0` up to a constant: ``log((x0 + 1) / 2)``, clipped.

    Used when the network predicts noise: the x0 derived from it is a point in [-1, 1]^C,
    read as class probabilities ``(x0 + 1) / 2``; the log makes it usable as logits.
    """
    probs = jnp.clip((x0 + 1.0) / 2.0, eps, 1.0)
    return jnp.log(probs)


def x0_to_mask_logits(x0: jax.Array, eps: float = LOG_EPS) -> jax.Array:
    """Logits ``(..., classes)`` of the final mask of a noise prediction, whose argmax is ``x0``'s.

    ``log(p)`` of ``p = (x0 + 1) / 2`` as :func:`x0_to_logits`, but without its clip at 1 and
    continued below the floor ``eps`` by its tangent, ``log(eps) + (p - eps) / eps``: strictly
    increasing in each class's ``x0`` over the real line, so the argmax over classes is that of
    the unclipped ``x0`` itself (the reference's mask; in float32, up to values within rounding of
    each other). The clip of :func:`x0_to_logits` would tie every class with ``x0 >= 1`` at 0,
    and the first of them would win. Their softmax, the probabilities that sliding windows blend,
    is ``p`` normalised over the classes, a class with ``p < eps`` counting as less than ``eps``
    (``eps · exp((p − eps) / eps)``): the reading ``p = (x0 + 1) / 2`` that an x0 run's softmax
    is exactly (its ``x0 = 2·softmax − 1``).
    """
    p = (x0 + 1.0) / 2.0
    # The two terms of the piecewise map: the log above the floor, the line below it.
    return jnp.log(jnp.maximum(p, eps)) + jnp.minimum(p - eps, 0.0) / eps


@dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """A K-step DDPM schedule; all arrays have length K and are float64 (``timesteps`` int).

    Attributes:
        num_timesteps: T of the original schedule (1000 in the paper).
        timesteps: ``t_k`` (1-indexed original steps); the network's time input.
        betas: ``beta_k = 1 - abar_k / abar_{k-1}`` with ``abar_{-1} = 1``.
        alphas_cumprod: ``abar_k = abar(t_k)``.
        alphas_cumprod_prev: ``abar_{k-1}`` (1 for ``k = 0``).
        posterior_variance: ``beta~_k = (1 - abar_{k-1}) / (1 - abar_k) * beta_k``.
        posterior_mean_coef1: coefficient of ``x0`` in the posterior mean (paper eq. 5).
        posterior_mean_coef2: coefficient of ``x_k`` in the posterior mean (paper eq. 5).
        variance: the sampling variance: ``Variance.FIXED_LARGE`` (``sigma^2_k = beta_k``, the
            reference code's ``model_var_type``) or ``Variance.BETA_TILDE`` (the paper's text).
        sampling_variance: ``sigma^2_k`` of each reverse step; 0 at ``k = 0`` (the last step
            adds no noise) whichever the variance.
        x0_limit: the x0 derived from a noise prediction is clipped to ``[-x0_limit, x0_limit]``;
            0 (the default, the reference's ``x_limit: 0``) leaves it unclipped.
        log_eps: the probability floor of :meth:`to_logits` (the reference's ``EPS``).
        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: ``sqrt(abar_k)``, ``sqrt(1 - abar_k)``
            (derived, as improved-diffusion keeps them).
        sampling_std: ``sigma_k`` (derived).
    """

    num_timesteps: int
    timesteps: np.ndarray
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    posterior_variance: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    variance: Variance
    sampling_variance: np.ndarray
    x0_limit: float = 0.0
    log_eps: float = LOG_EPS
    sqrt_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_one_minus_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sampling_std: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Once, in float64: every method indexes these by k (frozen: hence object.__setattr__).
        object.__setattr__(self, "sqrt_alphas_cumprod", np.sqrt(self.alphas_cumprod))
        object.__setattr__(self, "sqrt_one_minus_alphas_cumprod", np.sqrt(1.0 - self.alphas_cumprod))
        object.__setattr__(self, "sampling_std", np.sqrt(self.sampling_variance))

    @classmethod
    def linear(
        cls,
        num_timesteps: int = 1000,
        num_steps: int = 5,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        variance: Variance | str = Variance.FIXED_LARGE,
        x0_limit: float = 0.0,
        log_eps: float = LOG_EPS,
    ) -> GaussianDiffusion:
        """Linear beta schedule over T steps, resampled to K steps ``t_k = round(linspace(1, T, K))``."""
        variance = Variance(variance)
        if not 1 <= num_steps <= num_timesteps:
            raise ValueError(f"num_steps={num_steps} must lie in [1, num_timesteps={num_timesteps}]")
        full_betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
        full_abar = np.cumprod(1.0 - full_betas)
        timesteps = np.round(np.linspace(1, num_timesteps, num_steps)).astype(np.int64)
        if len(np.unique(timesteps)) != num_steps:  # only possible for K > T, excluded above
            raise ValueError(f"resampled timesteps are not distinct: {timesteps.tolist()}")
        abar = full_abar[timesteps - 1]
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        betas = 1.0 - abar / abar_prev
        alphas = 1.0 - betas
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        sampling_variance = (betas if variance is Variance.FIXED_LARGE else posterior_variance).copy()
        sampling_variance[0] = 0.0
        return cls(
            num_timesteps=num_timesteps,
            timesteps=timesteps,
            betas=betas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            posterior_variance=posterior_variance,
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
            variance=variance,
            sampling_variance=sampling_variance,
            x0_limit=float(x0_limit),
            log_eps=float(log_eps),
        )

    @classmethod
    def from_config(
        cls, diffusion_cfg: DiffusionConfig | Mapping[str, Any], num_steps: int | None = None
    ) -> GaussianDiffusion:
        """Build from a run config's ``diffusion`` section (a mapping: its keys over
        ``DiffusionConfig``'s defaults); ``num_steps`` defaults to ``train_steps``."""
        cfg = as_section(DiffusionConfig, diffusion_cfg)
        return cls.linear(
            num_timesteps=cfg.num_timesteps,
            num_steps=cfg.train_steps if num_steps is None else int(num_steps),
            beta_start=float(cfg.beta_start),
            beta_end=float(cfg.beta_end),
            variance=cfg.variance,
            x0_limit=float(cfg.x0_limit),
            log_eps=float(cfg.log_eps),
        )

    @property
    def num_steps(self) -> int:
        """K, the number of resampled steps."""
        return len(self.timesteps)

    # -- indexing -------------------------------------------------------------------------

    @staticmethod
    def _take(coef: np.ndarray, k: jax.Array, like: jax.Array) -> jax.Array:
        """``coef[k]`` as ``like``'s float dtype, shaped ``(batch, 1, ..., 1)`` to broadcast."""
        values = jnp.asarray(coef, dtype=like.dtype)[k]
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    def t(self, k: jax.Array) -> jax.Array:
        """Original step index ``t_k`` (int32) of positions ``k`` — the network's time input."""
        return jnp.asarray(self.timesteps, dtype=jnp.int32)[k]

    def random_k(self, key: jax.Array, batch_size: int) -> jax.Array:
        """Uniform positions ``k`` in ``[0, K)``, shape ``(batch,)``."""
        return jax.random.randint(key, (batch_size,), 0, self.num_steps)

    # -- forward process ------------------------------------------------------------------

    def q_sample(self, x0: jax.Array, k: jax.Array, noise: jax.Array) -> jax.Array:
        """``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) noise``, all ``(batch, *spatial, classes)``."""
        return (
            self._take(self.sqrt_alphas_cumprod, k, x0) * x0
            + self._take(self.sqrt_one_minus_alphas_cumprod, k, x0) * noise
        )

    def x0_from_eps(self, x_t: jax.Array, k: jax.Array, eps: jax.Array) -> jax.Array:
        """Invert :meth:`q_sample` for ``x0`` given the noise."""
        return (x_t - self._take(self.sqrt_one_minus_alphas_cumprod, k, x_t) * eps) / self._take(
            self.sqrt_alphas_cumprod, k, x_t
        )

    def eps_from_x0(self, x_t: jax.Array, k: jax.Array, x0: jax.Array) -> jax.Array:
        """Invert :meth:`q_sample` for the noise given ``x0``."""
        return (x_t - self._take(self.sqrt_alphas_cumprod, k, x_t) * x0) / self._take(
            self.sqrt_one_minus_alphas_cumprod, k, x_t
        )

    # -- reverse process ------------------------------------------------------------------

    def q_posterior_mean(self, x0: jax.Array, x_t: jax.Array, k: jax.Array) -> jax.Array:
        """Mean of ``q(x_{k-1} | x_k, x0)`` (paper eq. 5 with the resampled coefficients)."""
        return (
            self._take(self.posterior_mean_coef1, k, x_t) * x0
            + self._take(self.posterior_mean_coef2, k, x_t) * x_t
        )

    def p_sample_step(self, x0_hat: jax.Array, x_t: jax.Array, k: jax.Array, noise: jax.Array) -> jax.Array:
        """One ancestral step ``x_{k-1} ~ N(mean(x0_hat, x_k), sigma^2_k)``; no noise at ``k = 0``."""
        mean = self.q_posterior_mean(x0_hat, x_t, k)
        std = self._take(self.sampling_std, k, x_t)  # exactly 0 at k = 0
        return mean + std * noise

    def predict_x0(
        self, output: jax.Array, x_t: jax.Array, k: jax.Array, prediction: Prediction | str
    ) -> jax.Array:
        """The network's output read as ``x0_hat``: from logits (``x0``: 2·softmax − 1, in [-1, 1]) or
        from noise (``epsilon``: unbounded unless ``x0_limit`` clips it)."""
        if Prediction(prediction) is Prediction.X0:
            return logits_to_x0(output)
        x0 = self.x0_from_eps(x_t, k, output.astype(x_t.dtype))
        return jnp.clip(x0, -self.x0_limit, self.x0_limit) if self.x0_limit > 0 else x0

    def to_logits(self, output: jax.Array, x0_hat: jax.Array, prediction: Prediction | str) -> jax.Array:
        """Logits of a step's prediction for the training loss: the network's own (``x0``), else
        ``x0_to_logits(x0_hat)`` (clipped at 1, as the reference's loss)."""
        return output if Prediction(prediction) is Prediction.X0 else x0_to_logits(x0_hat, self.log_eps)

    def mask_logits(self, output: jax.Array, x0_hat: jax.Array, prediction: Prediction | str) -> jax.Array:
        """Logits ``(batch, *spatial, classes)`` of a sampling step's mask: the segmentation is
        their argmax, and their softmax the class probabilities that sliding windows blend.

        ``x0``: the network's own logits, unchanged (``x0_hat = 2·softmax − 1``, the same
        argmax). ``epsilon``: :func:`x0_to_mask_logits` of the unclipped ``x0_hat``, whose argmax
        is ``x0_hat``'s, as the reference's mask (the argmax of the last ``x0_hat``); unlike
        :meth:`to_logits` (the loss's), which ties every class with ``x0_hat >= 1``.
        """
        if Prediction(prediction) is Prediction.X0:
            return output
        return x0_to_mask_logits(x0_hat, self.log_eps)

    # -- training -------------------------------------------------------------------------

    def recycled_x0(
        self,
        denoise_fn: Callable[[jax.Array, jax.Array], jax.Array],
        x0: jax.Array,
        k: jax.Array,
        noise: jax.Array,
        prediction: Prediction | str,
    ) -> jax.Array:
        """Recycling's start (paper eq. 8-9): the model's ``x0_hat`` from ``x0`` noised one step further.

        ``x0`` is noised with ``noise`` to ``k + 1`` (the last step stays the last: its input is
        near pure noise, so recycling changes almost nothing there), and ``denoise_fn(x, t)``'s
        output is read as ``x0_hat``, without gradient: training sees the model's own errors as
        sampling will, and learns nothing through this first pass. All ``(batch, *spatial, classes)``.
        """
        k_next = jnp.minimum(k + 1, self.num_steps - 1)
        x_next = self.q_sample(x0, k_next, noise)
        output = denoise_fn(x_next, self.t(k_next)).astype(jnp.float32)
        return jax.lax.stop_gradient(self.predict_x0(output, x_next, k_next, prediction))

    def training_input(
        self,
        x0: jax.Array,
        k: jax.Array,
        noise: jax.Array,
        recycle: tuple[Callable[[jax.Array, jax.Array], jax.Array], jax.Array] | None = None,
        prediction: Prediction | str = Prediction.X0,
    ) -> jax.Array:
        """The network's training input ``x_k`` ``(batch, *spatial, classes)`` at positions ``k``.

        Without ``recycle``: the ground truth ``x0`` (``2·onehot − 1``) noised to ``k`` with
        ``noise``. With ``recycle = (denoise_fn, first_noise)``: :meth:`recycled_x0` (the model's
        ``x0_hat`` under ``prediction``, from ``x0`` noised with ``first_noise``) noised to ``k``.
        """
        start = x0 if recycle is None else self.recycled_x0(recycle[0], x0, k, recycle[1], prediction)
        return self.q_sample(start, k, noise)

    def training_loss(
        self,
        output: jax.Array,
        x_t: jax.Array,
        k: jax.Array,
        noise: jax.Array,
        prediction: Prediction | str,
        segmentation_loss: Callable[[jax.Array], jax.Array],
        eps_l2_weight: float,
    ) -> jax.Array:
        """The loss of the network's ``output`` on ``x_t = training_input(..., noise)``, a scalar.

        ``x0``: ``segmentation_loss(output)``, the output being the mask's logits. ``epsilon``:
        ``segmentation_loss`` of the logits of the x0_hat the predicted noise implies
        (:meth:`to_logits`) plus ``eps_l2_weight`` times the mean squared error to ``noise``.
        The L2 target is the noise drawn for ``x_t`` even with recycling, where the noise leading
        from ``x_t`` back to the ground truth would be ``(x_t - sqrt(abar) x0) / sqrt(1 - abar)``:
        that blows up as ``1 / sqrt(1 - abar) = 100`` at ``t = 1``, an ill-posed target; the ground
        truth reaches the network through the segmentation loss on x0_hat.

        Args:
            output: the network's output ``(batch, *spatial, classes)`` float32.
            x_t, k, noise: its input ``(batch, *spatial, classes)``, positions ``(batch,)``, and
                the noise that made the input.
            prediction: what ``output`` is.
            segmentation_loss: ``logits (batch, *spatial, classes) -> scalar`` against the
                ground truth (training's cross-entropy and Dice).
            eps_l2_weight: the weight of the noise's L2 term (``epsilon`` only).
        """
        prediction = Prediction(prediction)
        if prediction is Prediction.X0:
            return segmentation_loss(output)
        x0_hat = self.predict_x0(output, x_t, k, prediction)
        seg = segmentation_loss(self.to_logits(output, x0_hat, prediction))
        return seg + float(eps_l2_weight) * jnp.mean((output - noise) ** 2)

    def sample(
        self,
        denoise_fn: Callable[[jax.Array, jax.Array], jax.Array],
        shape: tuple[int, ...],
        key: jax.Array,
        prediction: Prediction | str = Prediction.X0,
    ) -> jax.Array:
        """DDPM sampling over all K steps, from ``x_{K-1} ~ N(0, I)`` to the last ``x0_hat``.

        Args:
            denoise_fn: ``(x_k (batch, *spatial, classes), t (batch,) int32) -> output`` of the
                same shape (logits for ``x0`` prediction, noise for ``epsilon``).
            shape: ``(batch, *spatial, classes)``.
            key: PRNG key.
            prediction: what ``denoise_fn`` outputs (``x0`` or ``epsilon``).

        Returns:
            Logits ``(batch, *spatial, classes)`` of the last step's mask (:meth:`mask_logits`):
            the segmentation is their argmax, the argmax of the last ``x0_hat`` (for ``x0``, the
            network's logits; for ``epsilon``, a strictly increasing map of each class's unclipped
            ``x0_hat`` (:func:`x0_to_mask_logits`), whose softmax is ``(x0_hat + 1) / 2``
            normalised over the classes, floored near 0).
        """
        prediction = Prediction(prediction)
        key, first = jax.random.split(key)
        x_t = jax.random.normal(first, shape, dtype=jnp.float32)

        def body(i: int, carry: tuple[jax.Array, jax.Array, jax.Array]):
            x_t, _, key = carry
            k = jnp.full((shape[0],), self.num_steps - 1 - i, dtype=jnp.int32)
            output = denoise_fn(x_t, self.t(k)).astype(jnp.float32)
            x0_hat = self.predict_x0(output, x_t, k, prediction)
            key, sub = jax.random.split(key)
            x_prev = self.p_sample_step(x0_hat, x_t, k, jax.random.normal(sub, shape, jnp.float32))
            return x_prev, self.mask_logits(output, x0_hat, prediction), key

        init = (x_t, jnp.zeros(shape, jnp.float32), key)
        _, logits, _ = jax.lax.fori_loop(0, self.num_steps, body, init)
        return logits
