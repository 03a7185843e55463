"""One jitted training step: augment, noise (with recycling), accumulate gradients, update.

The diffusion math (the noisy input, recycling, the loss terms that depend on the prediction)
is :class:`diffseg.diffusion.GaussianDiffusion`'s; this module draws its randomness.

The batch is gathered on the host (``diffseg.train.feed``) and arrives on the devices already
sharded along its batch axis (data parallel, ``jax.sharding``); parameters are replicated, so
XLA inserts the gradient all-reduce. Device memory holds the step, never the dataset.

Shapes: a batch is ``images (B, X, Y, Z)`` float32 and ``labels (B, X, Y, Z)`` integer, ``B =
train.batch_size`` volumes, in 2D and 3D alike: the 2D network sees all ``B·Z`` axial slices and
the loss is taken on the reassembled volumes, as in the reference (``batch_size`` counts volumes).

Micro-batches (``train.micro_batch`` = m volumes per device per pass): the ``B`` volumes are
run as ``B / (m · devices)`` passes in a ``lax.scan`` whose gradients (and losses) are averaged.
Every loss is a mean over equally sized samples (``diffseg.train.losses``), so the mean of the
micro-batches' mean losses is the batch's mean loss. All randomness is drawn **per sample**,
from ``fold_in(step key, global sample index)`` (augmentation, diffusion position k, noise,
recycling noise), and the volumes are chosen on the host from (seed, step): the update does not
depend on the micro-batch size (up to float rounding in the sums).

Non-finite updates are skipped, as in the reference: when the loss or any gradient is not
finite, parameters and optimizer state are kept, ``state["step"]`` still advances (the next
step draws fresh randomness) and ``state["skipped"]`` counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffseg.data import augment_batch
from diffseg.diffusion import GaussianDiffusion, Prediction, mask_to_x0
from diffseg.errors import ConfigError
from diffseg.parallel import batch_sharding
from diffseg.runconfig import RunConfig, RunConfigLike
from diffseg.runs import init_params
from diffseg.train.losses import segmentation_loss

State = dict[str, Any]  # {"params", "opt_state", "step", "skipped"}


def build_optimizer(run_cfg: RunConfigLike) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up, cosine decay to ``optim.decay_steps`` then held, after clipping.

    ``decay_steps`` counts the warm-up (optax's convention, as the reference's 10 000 of
    12 500 steps); ``None`` decays over all of ``train.steps``.
    """
    run_cfg = RunConfig.of(run_cfg)
    optim = run_cfg.optim
    decay = run_cfg.train.steps if optim.decay_steps is None else optim.decay_steps
    warmup = min(optim.warmup_steps, max(decay - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=float(optim.init_learning_rate),
        peak_value=float(optim.learning_rate),
        warmup_steps=warmup,
        decay_steps=max(decay, warmup + 1),
        end_value=float(optim.end_learning_rate),
    )
    tx = optax.chain(
        optax.clip_by_global_norm(float(optim.grad_clip)),
        optax.adamw(schedule, weight_decay=float(optim.weight_decay)),
    )
    return tx, schedule


def init_state(
    model: Any,
    tx: optax.GradientTransformation,
    volume_shape: tuple[int, ...],
    key: jax.Array,
    channels: int = 1,
) -> State:
    """Fresh parameters and optimizer state for volumes of ``volume_shape`` ``(X, Y, Z)``, ``channels``."""
    params = init_params(model, volume_shape, key, channels)
    step, skipped = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)  # two buffers (both donated)
    return {"params": params, "opt_state": tx.init(params), "step": step, "skipped": skipped}


def sample_keys(step_key: jax.Array, index: jax.Array) -> jax.Array:
    """One key per sample: ``fold_in(step_key, i)`` for each global sample index ``i`` ``(n,)``."""
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(index)


def augment_samples(
    keys: jax.Array, images: jax.Array, labels: jax.Array, augment_cfg: dict[str, Any]
) -> tuple[jax.Array, jax.Array]:
    """``augment_batch`` with one key per sample ``keys (n,)``, so a sample's draw does not depend on
    which other samples share its pass. images/labels ``(n, X, Y, Z)`` → the same shapes, dtypes."""

    def one(key, image, label):
        image, label = augment_batch(key, image[None], label[None], augment_cfg)
        return image[0], label[0]

    return jax.vmap(one)(keys, images, labels)


def _per_sample(keys: jax.Array, draw: Callable[[jax.Array], jax.Array]) -> jax.Array:
    return jax.vmap(draw)(keys)


def noisy_input(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    diffusion: GaussianDiffusion,
    image: jax.Array,
    x0: jax.Array,
    k: jax.Array,
    key: jax.Array,
    prediction: Prediction | str,
    recycle: bool,
) -> tuple[jax.Array, jax.Array]:
    """The network's training input ``x_k`` ``(B, *S, C)`` at positions ``k`` ``(B,)``, and its noise.

    Draws the noise and hands the math to :meth:`GaussianDiffusion.training_input` (with
    ``recycle``, the model ``apply_fn(params, image, ·, ·)`` makes the first pass). ``key``: one
    key per sample ``(B,)`` (or a single key, split into ``B``); sample ``b``'s noise comes from
    ``key[b]`` only. The noise is drawn in ``x0``'s dtype (bfloat16 in a bf16 run, as the
    reference draws it).
    """
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    single = key.ndim == (0 if typed else 1)  # a raw uint32 key is (2,), one per sample (B, 2)
    keys = jax.random.split(key, x0.shape[0]) if single else key
    pairs = jax.vmap(jax.random.split)(keys)  # (B, 2): recycling's first pass, x_k

    def draw(column: int) -> jax.Array:
        return _per_sample(pairs[:, column], lambda kk: jax.random.normal(kk, x0.shape[1:], x0.dtype))

    def denoise(x_t: jax.Array, t: jax.Array) -> jax.Array:
        return apply_fn(params, image, x_t, t)

    noise = draw(1)
    first_pass = (denoise, draw(0)) if recycle else None
    return diffusion.training_input(x0, k, noise, recycle=first_pass, prediction=prediction), noise


def make_loss_fn(
    model: Any, run_cfg: RunConfigLike, num_classes: int
) -> Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]:
    """``loss(params, image (n,X,Y,Z,1), label (n,X,Y,Z), keys (n,)) -> scalar`` for the run's variant.

    ``keys`` holds one PRNG key per sample; the loss is the mean over the ``n`` samples.
    """
    run_cfg = RunConfig.of(run_cfg)
    diff_cfg, loss_cfg = run_cfg.diffusion, run_cfg.loss
    if not diff_cfg.enabled:

        def seg_loss(params, image, label, keys):
            del keys
            onehot = jax.nn.one_hot(label, num_classes, dtype=jnp.float32)
            return segmentation_loss(model.apply(params, image), onehot, loss_cfg)

        return seg_loss

    diffusion = GaussianDiffusion.from_config(diff_cfg)
    prediction, recycle = Prediction(diff_cfg.prediction), diff_cfg.recycle
    eps_l2_weight = float(loss_cfg.eps_l2_weight)

    def diffusion_loss(params, image, label, keys):
        pairs = jax.vmap(jax.random.split)(keys)  # (n, 2): position k, noise
        # (n, *S, C) in {-1, 1}, in the image's dtype: bf16 when cast early (train.bf16_inputs)
        x0 = mask_to_x0(label, num_classes).astype(image.dtype)
        onehot = (x0 + 1.0) / 2.0
        k = _per_sample(pairs[:, 0], lambda kk: jax.random.randint(kk, (), 0, diffusion.num_steps))
        x_t, noise = noisy_input(
            model.apply, params, diffusion, image, x0, k, pairs[:, 1], prediction, recycle
        )
        output = model.apply(params, image, x_t, diffusion.t(k)).astype(jnp.float32)

        def seg(logits: jax.Array) -> jax.Array:  # cross-entropy and Dice against the ground truth
            return segmentation_loss(logits, onehot, loss_cfg)

        return diffusion.training_loss(output, x_t, k, noise, prediction, seg, eps_l2_weight)

    return diffusion_loss


def check_micro_batch(run_cfg: RunConfigLike, devices: int, micro_batch: Any = None) -> int:
    """Volumes per device per pass, validated: ``micro_batch`` (else ``train.micro_batch``; null =
    the whole per-device batch) must divide ``train.batch_size / devices``. ``auto`` must have been
    resolved first (``diffseg.train.plan.choose_micro_batch``)."""
    run_cfg = RunConfig.of(run_cfg)
    batch_size = run_cfg.train.batch_size
    if batch_size % devices:
        raise ConfigError(
            f"train.batch_size={batch_size} is not divisible by the {devices} devices;"
            " train.devices: auto trains on as many as divide it"
        )
    per_device = batch_size // devices
    value = run_cfg.train.micro_batch if micro_batch is None else micro_batch
    if value is None:
        return per_device
    if value == "auto":
        raise ConfigError("train.micro_batch: 'auto' must be resolved before building the step")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or per_device % value:
        raise ConfigError(
            f"train.micro_batch: {value!r} must be null, auto, or a positive integer dividing "
            f"train.batch_size / devices = {per_device}"
        )
    return int(value)


def training_input_dtype(run_cfg: RunConfigLike) -> Any:
    """The dtype of a training sample's image, mask and noise: bfloat16 in a bf16 run with
    ``train.bf16_inputs: reference`` (the reference casts the image before augmentation and builds
    the one-hot mask and the noise in its dtype), else float32 (cast at the network's input)."""
    run_cfg = RunConfig.of(run_cfg)
    early = run_cfg.train.bf16 and run_cfg.train.bf16_inputs == "reference"
    return jnp.bfloat16 if early else jnp.float32


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    run_cfg: RunConfigLike,
    num_classes: int,
    mesh: Mesh,
    micro_batch: int | None = None,
) -> Callable[[State, jax.Array, jax.Array, jax.Array], tuple[State, jax.Array]]:
    """The jitted ``step(state, images (B,X,Y,Z), labels (B,X,Y,Z), key) -> (state, loss)``.

    ``images`` float32 and ``labels`` integer are the step's ``B = train.batch_size`` volumes, not
    yet augmented, best already sharded along the batch axis (``diffseg.train.feed``); ``key`` is the
    run's step key, folded with ``state["step"]`` inside (resume-safe). ``micro_batch`` (volumes
    per device per pass; default ``train.micro_batch``, null = all ``B / devices`` at once) sets how
    many passes the gradient is accumulated over; the result does not depend on it. ``loss`` is
    the batch's mean loss (NaN or inf when the update was skipped).
    """
    run_cfg = RunConfig.of(run_cfg)
    devices = mesh.size
    m = check_micro_batch(run_cfg, devices, micro_batch)
    batch_size = run_cfg.train.batch_size
    passes = batch_size // (devices * m)
    augment_cfg = run_cfg.train.augment.to_dict()
    input_dtype = training_input_dtype(run_cfg)
    loss_fn = make_loss_fn(model, run_cfg, num_classes)
    grad_fn = jax.value_and_grad(loss_fn)
    split = batch_sharding(mesh)
    split_passes = NamedSharding(mesh, PartitionSpec(None, "data"))

    def by_pass(x: jax.Array) -> jax.Array:
        """``(B, ...)`` → ``(passes, devices·m, ...)``: pass j takes m samples of each device's share."""
        x = jax.lax.with_sharding_constraint(x, split)
        x = x.reshape(devices, passes, m, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1).reshape(passes, devices * m, *x.shape[3:])
        return jax.lax.with_sharding_constraint(x, split_passes)

    def one_pass(params, step_key, image, label, index):
        """Mean loss and gradients of ``n`` samples ``(n, X, Y, Z)`` with global indices ``index``."""
        keys = sample_keys(step_key, index)
        key_pairs = jax.vmap(jax.random.split)(keys)  # (n, 2): augmentation, loss
        image = image.astype(input_dtype)  # bf16 before augmentation, as the reference casts it
        image, label = augment_samples(key_pairs[:, 0], image, label.astype(jnp.int32), augment_cfg)
        if image.ndim == label.ndim:  # one channel: add the network's channel axis
            image = image[..., None]
        image = image.astype(input_dtype)
        return grad_fn(params, image, label, key_pairs[:, 1])

    def step(state: State, images: jax.Array, labels: jax.Array, key: jax.Array):
        step_key = jax.random.fold_in(key, state["step"])  # the step's randomness: resume-safe
        params = state["params"]
        index = jnp.arange(batch_size, dtype=jnp.int32)
        if passes == 1:
            images = jax.lax.with_sharding_constraint(images, split)
            labels = jax.lax.with_sharding_constraint(labels, split)
            loss, grads = one_pass(params, step_key, images, labels, index)
        else:
            xs = (by_pass(images), by_pass(labels), by_pass(index))

            def body(carry, x):
                loss, grads = one_pass(params, step_key, *x)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(body, zeros, xs)
            loss, grads = loss / passes, jax.tree.map(lambda g: g / passes, grads)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = {
            "params": keep(new_params, params),
            "opt_state": keep(opt_state, state["opt_state"]),
            "step": state["step"] + 1,
            "skipped": state.get("skipped", jnp.zeros((), jnp.int32)) + (~finite).astype(jnp.int32),
        }
        return new_state, loss

    return jax.jit(step, donate_argnums=0)
