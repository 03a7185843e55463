"""One jitted training step: sample a batch on device, augment, noise (with recycling), update.

The whole step, batch sampling included, is one XLA program: the training volumes live on
the devices (replicated), the batch axis is sharded over all local devices (data parallel,
``jax.sharding``), and parameters are replicated, so XLA inserts the gradient all-reduce.

Shapes: training volumes ``(N, X, Y, Z)``; a batch is ``(B, X, Y, Z, ·)`` in 2D and 3D alike: the
2D network sees all ``B·Z`` axial slices and the loss is taken on the reassembled volumes, as
in the reference (``batch_size`` counts volumes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from diffseg.data import augment_batch
from diffseg.diffusion import GaussianDiffusion, mask_to_x0, x0_to_logits
from diffseg.parallel import batch_sharding
from diffseg.runs import init_params
from diffseg.train.losses import segmentation_loss

State = dict[str, Any]  # {"params", "opt_state", "step"}


def build_optimizer(run_cfg: dict[str, Any]) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up, cosine decay to ``optim.decay_steps`` then held, after clipping.

    ``decay_steps`` counts the warm-up (optax's convention, as the reference's 10 000 of
    12 500 steps); ``None`` decays over all of ``train.steps``.
    """
    optim, steps = run_cfg["optim"], int(run_cfg["train"]["steps"])
    decay = optim.get("decay_steps")
    decay = steps if decay is None else int(decay)
    warmup = min(int(optim["warmup_steps"]), max(decay - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=float(optim["init_learning_rate"]),
        peak_value=float(optim["learning_rate"]),
        warmup_steps=warmup,
        decay_steps=max(decay, warmup + 1),
        end_value=float(optim["end_learning_rate"]),
    )
    tx = optax.chain(
        optax.clip_by_global_norm(float(optim["grad_clip"])),
        optax.adamw(schedule, weight_decay=float(optim["weight_decay"])),
    )
    return tx, schedule


def init_state(
    model: Any, tx: optax.GradientTransformation, volume_shape: tuple[int, ...], key: jax.Array
) -> State:
    """Fresh parameters and optimizer state for volumes of ``volume_shape`` ``(X, Y, Z)``."""
    params = init_params(model, volume_shape, key)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def sample_batch(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    batch_size: int,
    augment_cfg: dict[str, Any],
) -> tuple[jax.Array, jax.Array]:
    """Random (augmented) training volumes, for the 2D and the 3D network alike.

    Args:
        images: ``(N, X, Y, Z)`` float32; labels: ``(N, X, Y, Z)`` integer.

    Returns:
        images ``(B, X, Y, Z, 1)`` float32 and labels ``(B, X, Y, Z)`` int32.
    """
    key_index, key_augment = jax.random.split(key)
    index = jax.random.randint(key_index, (batch_size,), 0, images.shape[0])
    image, label = images[index], labels[index]
    image, label = augment_batch(key_augment, image, label, augment_cfg)
    return image[..., None].astype(jnp.float32), label.astype(jnp.int32)


def noisy_input(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    diffusion: GaussianDiffusion,
    image: jax.Array,
    x0: jax.Array,
    k: jax.Array,
    key: jax.Array,
    prediction: str,
    recycle: bool,
) -> tuple[jax.Array, jax.Array]:
    """The network's training input ``x_k`` ``(B, *S, C)`` at positions ``k`` ``(B,)``, and its noise.

    Without recycling, the ground truth ``x0`` noised to ``k``. With recycling (paper eq. 8-9):
    noise the ground truth one step further, let the model predict ``x0`` from it without
    gradient, and noise that prediction to ``k`` with fresh noise, so training sees the model's
    own errors as sampling will. At the last step the "further" step is the last step itself
    (its input is near pure noise, so recycling changes almost nothing there).
    """
    key_first, key_noise = jax.random.split(key)
    start = x0
    if recycle:
        k_next = jnp.minimum(k + 1, diffusion.num_steps - 1)
        x_next = diffusion.q_sample(x0, k_next, jax.random.normal(key_first, x0.shape))
        output = apply_fn(params, image, x_next, diffusion.t(k_next)).astype(jnp.float32)
        start = jax.lax.stop_gradient(diffusion.predict_x0(output, x_next, k_next, prediction))
    noise = jax.random.normal(key_noise, x0.shape)
    return diffusion.q_sample(start, k, noise), noise


def make_loss_fn(
    model: Any, run_cfg: dict[str, Any], num_classes: int
) -> Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]:
    """``loss(params, image (B,X,Y,Z,1), label (B,X,Y,Z), key) -> scalar`` for the run's variant."""
    diff_cfg, loss_cfg = run_cfg["diffusion"], run_cfg["loss"]
    if not diff_cfg["enabled"]:

        def seg_loss(params, image, label, key):
            del key
            onehot = jax.nn.one_hot(label, num_classes, dtype=jnp.float32)
            return segmentation_loss(model.apply(params, image), onehot, loss_cfg)

        return seg_loss

    diffusion = GaussianDiffusion.from_config(diff_cfg)
    prediction, recycle = diff_cfg["prediction"], bool(diff_cfg["recycle"])

    def diffusion_loss(params, image, label, key):
        key_k, key_noise = jax.random.split(key)
        x0 = mask_to_x0(label, num_classes)  # (B, *S, C) in {-1, 1}
        onehot = (x0 + 1.0) / 2.0
        k = diffusion.random_k(key_k, label.shape[0])
        x_t, noise = noisy_input(model.apply, params, diffusion, image, x0, k, key_noise, prediction, recycle)
        output = model.apply(params, image, x_t, diffusion.t(k)).astype(jnp.float32)
        if prediction == "x0":
            return segmentation_loss(output, onehot, loss_cfg)
        # epsilon: the L2 target is the noise drawn for x_t. (With recycling, the noise that
        # would lead from x_t back to the ground truth is (x_t - sqrt(abar) x0) / sqrt(1 - abar),
        # which blows up as 1 / sqrt(1 - abar) = 100 at t = 1: an ill-posed target.) The ground
        # truth reaches the network through the segmentation loss on x0_hat.
        x0_hat = diffusion.predict_x0(output, x_t, k, prediction)
        seg = segmentation_loss(x0_to_logits(x0_hat), onehot, loss_cfg)
        return seg + float(loss_cfg["eps_l2_weight"]) * jnp.mean((output - noise) ** 2)

    return diffusion_loss


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    run_cfg: dict[str, Any],
    num_classes: int,
    mesh: Mesh,
) -> Callable[[State, jax.Array, jax.Array, jax.Array], tuple[State, jax.Array]]:
    """The jitted ``step(state, images (N,X,Y,Z), labels (N,X,Y,Z), key) -> (state, loss)``."""
    train_cfg = run_cfg["train"]
    batch_size = int(train_cfg["batch_size"])
    if batch_size % mesh.size:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the {mesh.size} devices")
    augment_cfg = dict(train_cfg["augment"])
    loss_fn = make_loss_fn(model, run_cfg, num_classes)
    split = batch_sharding(mesh)

    def step(state: State, images: jax.Array, labels: jax.Array, key: jax.Array):
        key = jax.random.fold_in(key, state["step"])  # the step's randomness: resume-safe
        key_batch, key_loss = jax.random.split(key)
        image, label = sample_batch(key_batch, images, labels, batch_size, augment_cfg)
        image = jax.lax.with_sharding_constraint(image, split)
        label = jax.lax.with_sharding_constraint(label, split)
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], image, label, key_loss)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

    return jax.jit(step, donate_argnums=0)
