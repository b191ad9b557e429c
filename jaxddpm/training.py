"""The train state, the optimizer, and the pure train step (floor 3).

DDPM's recipe (Ho et al. 2020, Appendix B): Adam, learning rate 2e-4 with a linear warm-up over 5000
steps, gradient clipping at global norm 1, and an exponential moving average of the parameters with
decay 0.9999. `train_step` is a pure function of (state, batch); `make_train_step` jits it once with
explicit shardings and a donated state.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxddpm import losses, parallel
from jaxddpm.core.process import Process
from jaxddpm.schedule import Schedule


@flax.struct.dataclass
class TrainState:
  """Everything training needs to continue exactly: a pytree.

  step: int32 scalar, updates applied so far (skipped non-finite steps count as steps).
  params / ema_params: the network parameters and their exponential moving average.
  opt_state: the optax state. rng: uint32 [2] raw PRNG key, folded with the step every update.
  nonfinite_streak / nonfinite_total: int32 scalars, non-finite steps in a row / in all (updates skipped).
  """
  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jnp.ndarray
  nonfinite_streak: jnp.ndarray
  nonfinite_total: jnp.ndarray


def learning_rate_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
  """lr(step) = lr * min(1, (step + 1) / warmup_steps) (DDPM's linear warm-up; constant afterwards)."""
  if warmup_steps <= 0:
    return optax.constant_schedule(lr)
  return lambda step: lr * jnp.minimum(1.0, (step + 1.0) / warmup_steps)


def global_norm(tree) -> jnp.ndarray:
  """||g||_2 = sqrt(sum over leaves of sum(g^2)), accumulated in float32. Scalar."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """g <- g * min(1, max_norm / ||g||), i.e. g if ||g|| < max_norm (Pascanu et al. 2013; optax's rule).

  `update(g, state, params, grad_norm=n)` reuses a norm the caller already has: the train step computes
  it for its metrics and non-finite guard, and inside the guard's branch XLA cannot share it (a second
  norm is one more reduction per leaf, a few % of a small model's step on CPU).
  """
  def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    n = global_norm(updates) if grad_norm is None else grad_norm
    # One scalar factor: XLA fuses g * scale into each consumer; a per-element g / ||g|| is materialised.
    scale = jnp.where(n < max_norm, 1.0, max_norm / n)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(*, lr: float, warmup_steps: int, grad_clip: float, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Global-norm clipping (if grad_clip > 0) then Adam(W) with the warm-up schedule.

  With clipping, `update` accepts `grad_norm=` (the gradients' norm, if already computed).
  """
  sched = learning_rate_schedule(lr, warmup_steps)
  opt = (optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay) if weight_decay
         else optax.adam(sched, b1=b1, b2=b2, eps=eps))
  return optax.chain(clip_by_global_norm(grad_clip), opt) if grad_clip > 0 else opt


def ema_decay(step, decay: float, warmup: bool):
  """EMA decay at a step: min(decay, (1 + step) / (10 + step)) with warm-up, else decay."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)


def init_train_state(key, model, optimizer: optax.GradientTransformation, image_shape) -> TrainState:
  """Initial state: params from model.init on a dummy batch [1, H, W, C], EMA = params, step 0.

  Pure, so `jax.eval_shape(lambda k: init_train_state(k, ...), key)` gives the abstract state.
  """
  init_key, state_key = jax.random.split(key)
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  params = model.init({"params": init_key}, x, jnp.zeros((1,), jnp.int32), train=False)["params"]
  if jnp.issubdtype(state_key.dtype, jax.dtypes.prng_key):
    state_key = jax.random.key_data(state_key)
  zero = lambda: jnp.zeros((), jnp.int32)  # separate buffers, for donation
  ema = jax.tree.map(jnp.copy, params)  # its own buffers: the state is donated leaf by leaf
  return TrainState(step=zero(), params=params, ema_params=ema, opt_state=optimizer.init(params),
                    rng=state_key, nonfinite_streak=zero(), nonfinite_total=zero())


def all_finite(*trees) -> jnp.ndarray:
  """True iff every floating-point element of the trees is finite: sum(x * 0) == 0 over all leaves
  (x * 0 is 0 for finite x and NaN for +-inf or NaN; an add-reduction, fused into the pass that makes x)."""
  leaves = [x for t in trees for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return sum(jnp.sum(x * jnp.zeros((), x.dtype), dtype=jnp.float32) for x in leaves) == 0


def _candidate(state, grads, grad_norm, opt):
  """(new params, new optimizer state) of the optimizer's update, unguarded."""
  updates, new_opt_state = opt.update(grads, state.opt_state, state.params, grad_norm=grad_norm)
  return optax.apply_updates(state.params, updates), new_opt_state


def _ema(ema_params, params, d):
  """e <- d e + (1 - d) p."""
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)


def guard_select(state, grads, grad_norm, finite, opt, d):
  """The update computed, judged (its result all finite) and kept or dropped by an elementwise select
  with a scalar predicate, which XLA fuses into the update's own passes: no conditional, so no host
  round-trip on backends whose conditionals read the predicate on the host. Returns (ok, (params,
  ema_params, opt_state))."""
  params, opt_state = _candidate(state, grads, grad_norm, opt)
  ok = finite & all_finite(params, opt_state)
  keep = lambda new, old: jnp.where(ok, new, old)
  params, opt_state = jax.tree.map(keep, params, state.params), jax.tree.map(keep, opt_state, state.opt_state)
  return ok, (params, jax.tree.map(keep, _ema(state.ema_params, params, d), state.ema_params), opt_state)


def guard_branch(state, grads, grad_norm, finite, opt, d):
  """The update's result judged by a read-only pass (the candidate is reduced, not stored), then
  `lax.cond(ok, update, keep)`: the update's passes run once, or not at all. On XLA:CPU a select over
  every leaf is not fused into the update and costs several more passes over the state."""
  ok = finite & all_finite(*_candidate(state, grads, grad_norm, opt))

  def update(_):
    params, opt_state = _candidate(state, grads, grad_norm, opt)
    return params, _ema(state.ema_params, params, d), opt_state

  return ok, jax.lax.cond(ok, update, lambda _: (state.params, state.ema_params, state.opt_state), None)


def guard_auto(state, grads, grad_norm, finite, opt, d):
  """`guard_branch` when compiled for CPU, `guard_select` for GPU and TPU (decided at lowering)."""
  with_opt = lambda guard: lambda *a: guard(*a[:4], opt, a[4])
  return jax.lax.platform_dependent(state, grads, grad_norm, finite, d, cpu=with_opt(guard_branch),
                                    default=with_opt(guard_select))


# How the non-finite guard is compiled; every choice skips exactly the same steps.
GUARDS = {"auto": guard_auto, "select": guard_select, "branch": guard_branch}


def train_step(state: TrainState, batch: dict, *, model, optimizer: optax.GradientTransformation,
               schedule: Schedule | Process, mean_type: str, var_type: str, loss_type: str, weighting: str = "none",
               t_sampling: str = "uniform", min_snr_gamma: float = 5.0, p2_gamma: float = 1.0,
               p2_k: float = 1.0, ema: float = 0.9999, ema_warmup: bool = True,
               learning_rate: Callable | None = None, guard: str = "auto"):
  """One update: t ~ U{0..T-1} (or float t on a continuous `Process`, chosen by the process),
  eps ~ N(0, I), loss = mean_b process_losses(x_0, t, eps), Adam step, EMA update. A step whose loss,
  gradient norm, new parameters or new optimizer state is not finite is skipped (params, optimizer state
  and EMA keep their values) and counted; `guard` (GUARDS) only says how the skip is compiled.

  batch: {"image": float32 [B, H, W, C] in [-1, 1]}. Returns (new state, metrics dict of scalars).
  The random numbers depend only on (state.rng, state.step), never on the device layout.
  """
  x0 = batch["image"]
  B = x0.shape[0]
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  t_key, noise_key, dropout_key = jax.random.split(key, 3)
  t = losses.sample_time(schedule, t_key, B, t_sampling)  # int32 entries, or float t on a Process
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)

  def loss_fn(params):
    model_fn = lambda x, tt: model.apply({"params": params}, x, tt, train=True, rngs={"dropout": dropout_key})
    terms = losses.process_losses(schedule, model_fn, x0, t, noise, mean_type=mean_type, var_type=var_type,
                                  loss_type=loss_type, weighting=weighting, min_snr_gamma=min_snr_gamma,
                                  p2_gamma=p2_gamma, p2_k=p2_k)
    return jnp.mean(terms["loss"]), terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = global_norm(grads)

  opt = optax.with_extra_args_support(optimizer)  # a plain optax optimizer ignores grad_norm=
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  d = ema_decay(state.step, ema, ema_warmup)
  finite, (params, ema_params, opt_state) = GUARDS[guard](state, grads, grad_norm, finite, opt, d)
  new_state = state.replace(
      step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
      nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, 1))
  quartile = losses.time_quartile(schedule, t)
  metrics = {"loss": loss, "mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"]),
             "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
             "nonfinite_total": new_state.nonfinite_total.astype(jnp.float32)}
  if learning_rate is not None:
    metrics["lr"] = jnp.asarray(learning_rate(state.step), jnp.float32)
  for q in range(4):
    m = (quartile == q).astype(jnp.float32)
    metrics[f"loss_q{q}"] = jnp.sum(terms["loss"] * m) / jnp.maximum(jnp.sum(m), 1.0)
  return new_state, metrics


def jit_train_step(step_fn: Callable, mesh) -> Callable:
  """jit(step_fn) with the state replicated and donated, the batch sharded over the mesh's "data" axis."""
  rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(step_fn, in_shardings=(rep, bat), out_shardings=(rep, rep), donate_argnums=(0,))
