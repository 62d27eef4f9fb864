"""Checks that need 8 devices. Not collected by the main session (which runs on one device); the wrapper in
test_sharding.py runs this file in a child pytest with JAX_NUM_CPU_DEVICES=8 and the session's trained tiny
BLT (BLT_TINY_BLT_RUN)."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from blt_jax import cli, model as model_lib, sharding
from blt_jax.config import MeshConfig, get_preset
from blt_jax.generation import api
from blt_jax.train import checkpoint as ckpt
from blt_jax.train.loop import to_device
from blt_jax.train.step import create_train_state, init_train_state, make_optimizer, make_step_fns, plan_train_state

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (run by test_sharding.py)")

MESH_222 = MeshConfig(ici_parallelism=(2, 2, 2), min_sharded_param_bytes=1024)


def _setup():
    cfg = get_preset("tiny")
    model_cfg = dataclasses.replace(cfg.model, patching=dataclasses.replace(cfg.model.patching, mode="static"),
                                    global_model=dataclasses.replace(cfg.model.global_model, n_layers=1))
    tc = dataclasses.replace(cfg.train, warmup_steps=0)
    tx = make_optimizer(tc)
    rng = np.random.default_rng(0)
    B, S = 8, 64
    tokens = rng.integers(4, 260, (B, S + 1)).astype(np.int32)
    tokens[:, 0] = 1
    starts = np.zeros((B, S + 1), bool)
    starts[:, 0] = starts[:, 1] = True
    starts[:, 1::4] = True
    batch = {"tokens": tokens[:, :S], "targets": tokens[:, 1:], "loss_mask": np.ones((B, S), np.float32),
             "patch_starts": starts, "dropped_bytes": np.zeros((B,), np.int32)}
    return model_cfg, tc, tx, batch


def _single_device(model_cfg, tc, tx, batch, steps=2):
    graphdef, params = model_lib.build(model_cfg, seed=tc.seed)
    state = init_train_state(params, tx)
    fns = make_step_fns("blt", graphdef, tx, tc)
    losses = []
    for _ in range(steps):
        state, m = fns.train_step(state, to_device(batch))
        losses.append((float(m["loss"]), float(m["grad_norm"])))
    return state, losses


def _sharded_steps(model_cfg, tc, tx, mesh):
    """(placement, run): `run(state, steps)` trains `steps` steps on `mesh` with one compiled step."""
    graphdef, placement = plan_train_state(model_cfg, tx, mesh, MESH_222.rules, MESH_222.min_sharded_param_bytes)
    fns = make_step_fns("blt", graphdef, tx, tc, placement=placement)

    def run(state, batch, steps):
        losses = []
        with jax.set_mesh(mesh):
            for _ in range(steps):
                state, m = fns.train_step(state, to_device(batch, placement, process_local=False))
                losses.append((float(m["loss"]), float(m["grad_norm"])))
        return state, losses

    return placement, run


def test_sharded_train_steps_match_one_device_and_restore_onto_fewer_devices(tmp_path):
    model_cfg, tc, tx, batch = _setup()
    mesh = sharding.make_mesh(MESH_222)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    _, ref = _single_device(model_cfg, tc, tx, batch, steps=3)
    placement, run = _sharded_steps(model_cfg, tc, tx, mesh)
    state, got = run(create_train_state(model_cfg, tx, tc.seed, placement), batch, 2)
    # parameters really are split: a global-model kernel lives in quarters (fsdp x tensor), the Adam moments
    # follow their parameters
    kernel = state.params["global_transformer"]["layers"][0]["mlp"]["gate_proj"]["kernel"].get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)
    mu = jax.tree.leaves(state.opt_state[1][0].mu["global_transformer"]["layers"][0]["mlp"]["gate_proj"])[0]
    assert mu.sharding.spec == kernel.sharding.spec

    mngr = ckpt.open_manager(tmp_path, async_save=False)
    ckpt.save(mngr, 2, state)
    mngr.wait_until_finished()
    written = [np.asarray(x) for x in jax.tree.leaves(state)]  # before the (donating) next step
    _, third = run(state, batch, 1)
    # (loss, gradient norm) per step; steps 2 and 3 also check the sharded optimiser update. (Parameters are
    # not compared with one device's elementwise: Adam's first steps move a weight by ~lr whatever its
    # gradient's size, so a near-zero gradient that differs in the last bit may move it either way.)
    np.testing.assert_allclose(got + third, ref, rtol=5e-6)

    # the checkpoint of 8 devices restores onto 4 others, bit for bit, and gives the same next step
    small = sharding.make_mesh(dataclasses.replace(MESH_222, ici_parallelism=(1, 2, 2)), jax.devices()[4:])
    small_placement, small_run = _sharded_steps(model_cfg, tc, tx, small)
    step, restored = ckpt.restore(mngr, small_placement.abstract)
    mngr.close()
    assert step == 2
    for a, b in zip(written, jax.tree.leaves(restored), strict=True):
        assert b.sharding.mesh.size == 4
        np.testing.assert_array_equal(a, np.asarray(b))
    _, small_third = small_run(restored, batch, 1)
    np.testing.assert_allclose(small_third, third, rtol=5e-6)


def test_sharded_generation_gives_the_same_bytes():
    run = os.environ.get("BLT_TINY_BLT_RUN")
    if not run:
        pytest.skip("BLT_TINY_BLT_RUN not set")
    model = api.load(run)
    mesh = sharding.make_mesh(MeshConfig(ici_parallelism=(2, 4, 1)))
    sharded = api.on_mesh(model, mesh)
    emb = sharded.params["local_encoder"]["embed_tokens"]["embedding"].get_value()
    assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # vocab 260 does not split; embed does
    prompts = ["import json\n", "def dumps(obj", "class JSONDecoder(object):", "\n\n# "]
    # BLT-S: drafts, verification and cache rollback, on caches split over the batch
    plain = api.generate(model, prompts, max_new_bytes=40, method="s", stop_at_eos=False)
    split = api.generate(sharded, prompts, max_new_bytes=40, method="s", stop_at_eos=False)
    for p, q in zip(plain, split, strict=True):
        assert q.token_ids == p.token_ids
        assert len(p.token_ids) == 40


def test_aot_reports_per_device_memory(capsys):

    assert cli.main(["aot", "--preset", "tiny", "--set", "model.patching.mode=static",
                     "--set", "data.batch_size=8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["devices"] == 8 and report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # parameters split 8 ways (norm scales aside); state = params + two Adam moments
    assert report["params_per_device_gib"] < 1.2 * report["params_total_gib"] / 8
    assert report["train_state_per_device_gib"] == pytest.approx(3 * report["params_per_device_gib"], rel=0.01)
    assert report["peak_per_device_gib"] > report["train_state_per_device_gib"]
