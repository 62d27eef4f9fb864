"""Train state, optimiser and the jitted train / eval steps: pure functions of explicit pytrees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from blt_jax import model as model_lib, sharding
from blt_jax.config import BLTConfig, ConfigError, EntropyModelConfig, TrainConfig
from blt_jax.model.layers import cast_floating
from blt_jax.objectives import LN2, OBJECTIVES, evaluation_objective, training_objective


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the trained model
    opt_state: Any


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up to the peak, cosine decay to `min_lr_ratio * peak` at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.learning_rate, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.learning_rate * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW (weight decay on matrices and embedding tables, not on norm scales) + global-norm clipping."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                    mask=decay_mask),
    )


def init_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


@dataclass(frozen=True)
class Placement:
    """Where a run's state and batches live: the mesh, its logical-axis rules, and the train state's
    shardings (parameters and optimiser moments by their logical names; counters replicated)."""

    mesh: jax.sharding.Mesh
    rules: sharding.Rules
    state: Any  # NamedSharding per TrainState leaf
    abstract: Any  # TrainState of ShapeDtypeStructs carrying those shardings (restore target)

    @property
    def params(self) -> Any:
        return self.state.params

    @property
    def batch_rows(self) -> jax.sharding.NamedSharding:
        """Batches: rows split over the batch axes (the global batch must be a multiple of their size)."""
        return sharding.batch_sharding(self.mesh, self.rules)

    def check_batch(self, batch_size: int, what: str = "data.batch_size") -> None:
        """The batch splits evenly over the batch axes, and so that each process holds 1/process_count of its
        rows (each reads only its own share of the data)."""
        sharding.batch_sharding(self.mesh, self.rules, (batch_size,), what)
        held = {index[0].indices(batch_size)[:2]
                for index in self.batch_rows.addressable_devices_indices_map((batch_size,)).values()}
        if sum(stop - start for start, stop in held) * jax.process_count() != batch_size:
            raise ConfigError(f"mesh: the batch axes {self.rules.get('batch')} must split the batch across the "
                              f"{jax.process_count()} processes (each reads its own rows); put data or fsdp "
                              f"parallelism across processes (e.g. mesh.dcn_parallelism) rather than only tensor")


def plan_train_state(model_cfg: BLTConfig | EntropyModelConfig, tx: optax.GradientTransformation,
                     mesh: jax.sharding.Mesh, rules: sharding.Rules, min_sharded_bytes: int = 0
                     ) -> tuple[nnx.GraphDef, Placement]:
    """Shapes and shardings of the train state, computed abstractly (nothing is allocated); fails when a
    large parameter would be replicated on a multi-device mesh."""
    graphdef, abstract_params = model_lib.abstract_state(model_cfg)
    abstract = jax.eval_shape(lambda p: init_train_state(p, tx), abstract_params)
    shardings = sharding.tree_shardings(abstract, mesh, rules)
    sharding.check_params_sharded(abstract.params, shardings.params, min_sharded_bytes)
    return graphdef, Placement(mesh, rules, shardings, sharding.with_shardings(abstract, shardings))


def create_train_state(model_cfg: BLTConfig | EntropyModelConfig, tx: optax.GradientTransformation, seed: int,
                       placement: Placement) -> TrainState:
    """Initialise parameters and optimiser state directly into their shardings: each device computes only
    its own shards, so no host or device ever holds the whole model."""

    def init():
        return init_train_state(model_lib.build(model_cfg, seed)[1], tx)

    with jax.set_mesh(placement.mesh):
        return jax.jit(init, out_shardings=placement.state)()


@dataclass(frozen=True)
class StepFns:
    """The jitted entry points of one training task."""

    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_step: Callable[[Any, dict], dict]


def make_step_fns(kind: str, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, tc: TrainConfig,
                  eval_max_patches: Optional[int] = None, placement: Optional[Placement] = None) -> StepFns:
    """`kind` ("entropy" or "blt") and the model's config choose the objectives (`objectives.training_objective`:
    BLT-D when the config enables it; evaluation is next-byte alone). `eval_max_patches`: patch slots for
    evaluation (enough for every byte, so held-out bytes are never dropped by truncation). With a `placement`,
    the steps take and return the state in its shardings and batches split over the batch axes; call them
    under `jax.set_mesh(placement.mesh)`."""
    dtype = jnp.bfloat16 if tc.compute_dtype == "bfloat16" else jnp.float32

    base_key = jax.random.key(tc.seed)

    rules = placement.rules if placement is not None else None

    def loss_fn(params, batch, rng, remat, training: bool, max_patches=None):
        model = nnx.merge(graphdef, cast_floating(params, dtype) if dtype != jnp.float32 else params)
        objective = training_objective(kind, model.cfg) if training else evaluation_objective(kind)
        with sharding.activation_rules(rules):
            return OBJECTIVES[objective](model, batch, rng, remat, dtype, max_patches)

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(base_key, state.step)  # per-step randomness (BLT-D corruption): resumable
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng, tc.remat, True)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        next_byte = stats["nll_sum"] / jnp.maximum(stats["bytes"], 1.0)
        metrics = dict(stats, loss=loss, bits_per_byte=next_byte / LN2, grad_norm=optax.global_norm(grads),
                       learning_rate=learning_rate_schedule(tc)(state.step))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(params, batch):
        _, stats = loss_fn(params, batch, None, False, False, eval_max_patches)
        return stats

    if placement is None:
        return StepFns(train_step=jax.jit(train_step, donate_argnums=0), eval_step=jax.jit(eval_step))
    batch = placement.batch_rows
    metrics = sharding.replicated(placement.mesh)
    return StepFns(
        train_step=jax.jit(train_step, in_shardings=(placement.state, batch), out_shardings=(placement.state, metrics),
                           donate_argnums=0),
        eval_step=jax.jit(eval_step, in_shardings=(placement.params, batch), out_shardings=metrics))
