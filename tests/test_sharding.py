"""Pod scale: meshes from config, the logical-axis rules, the replicated-parameter check (on abstract meshes of
the real presets: nothing is allocated), multi-process settings, and, in child processes, the checks that
need 8 devices (tests/multidevice_checks.py) and two processes joined by jax.distributed."""

import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from blt_jax import distributed, prepare, sharding
from blt_jax.aot import tpu_topology_args
from blt_jax.config import MESH_AXES, ConfigError, MeshConfig, apply_overrides, get_preset
from blt_jax.distributed import DistributedConfig, DistributedError
from blt_jax.train.metrics import read_metrics
from blt_jax.train.step import make_optimizer, plan_train_state
from conftest import STDLIB

REPO = Path(__file__).resolve().parents[1]


def _devices(n, processes=1):
    return [SimpleNamespace(id=i, process_index=i * processes // n, platform="cpu") for i in range(n)]


def _abstract_mesh(shape):
    return AbstractMesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def test_mesh_shapes_fill_the_devices_and_refuse_what_cannot_tile_them():
    assert sharding.mesh_shape(MeshConfig(), _devices(8)) == ((1, 8, 1), (1, 1, 1))
    assert sharding.mesh_shape(MeshConfig(ici_parallelism=(2, -1, 2)), _devices(8)) == ((2, 2, 2), (1, 1, 1))
    # dcn: slices are processes off TPU; -1 in dcn takes their number
    assert sharding.mesh_shape(MeshConfig(dcn_parallelism=(-1, 1, 1)), _devices(8, 2)) == ((1, 4, 1), (2, 1, 1))
    with pytest.raises(ConfigError, match="mesh.ici_parallelism.*cannot tile 8 devices"):
        sharding.mesh_shape(MeshConfig(ici_parallelism=(3, -1, 1)), _devices(8))
    with pytest.raises(ConfigError, match="mesh.ici_parallelism.*holds 4 devices, but there are 8"):
        sharding.mesh_shape(MeshConfig(ici_parallelism=(2, 2, 1)), _devices(8))
    with pytest.raises(ConfigError, match="mesh.ici_parallelism"):
        apply_overrides(get_preset("tiny"), ["mesh.ici_parallelism=[1,-1,-1]"])
    with pytest.raises(ConfigError, match="mesh.logical_axis_rules.*'embed'"):
        apply_overrides(get_preset("tiny"), ['mesh.logical_axis_rules=[["embed", ["model"]]]'])


def test_logical_axes_map_to_free_dividing_mesh_axes():
    mesh = _abstract_mesh((2, 4, 2))
    rules = MeshConfig().rules
    assert sharding.logical_to_spec(("embed", "mlp"), (1024, 4096), mesh, rules) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "length", "act_embed"), (16, 8, 4), mesh, rules) == \
        P(("data", "fsdp"), None, None)
    # an axis that does not divide the dimension is skipped, never split unevenly
    assert sharding.logical_to_spec(("vocab", "embed"), (259, 1024), mesh, rules) == P(None, "fsdp")
    assert sharding.logical_to_spec(("batch",), (6,), mesh, rules) == P("data")
    # a mesh axis serves one dimension only
    assert sharding.logical_to_spec(("embed", "embed"), (8, 8), mesh, {"embed": ("fsdp",)}) == P("fsdp", None)
    with pytest.raises(ConfigError, match="no rule for the logical axis 'heads'"):
        sharding.logical_to_spec(("heads",), (8,), mesh, rules)
    with pytest.raises(ConfigError, match="6 rows cannot be split evenly.*multiple of 8"):
        sharding.batch_sharding(_abstract_mesh((2, 4, 1)), rules, (6,))


@pytest.mark.parametrize("preset,mesh_shape", [("fast-blt-1b", (1, 128, 1)), ("fast-blt-3b-d8", (2, 64, 2)),
                                               pytest.param("blt-1b", (1, 256, 1), marks=pytest.mark.slow)])
def test_real_presets_are_fully_sharded_and_a_replicated_config_is_refused(preset, mesh_shape):
    cfg = get_preset(preset)
    mesh = _abstract_mesh(mesh_shape)
    tx = make_optimizer(cfg.train)
    _, placement = plan_train_state(cfg.model, tx, mesh, cfg.mesh.rules, cfg.mesh.min_sharded_param_bytes)
    report = sharding.sharding_report(placement.abstract.params, placement.params, cfg.mesh.min_sharded_param_bytes)
    assert report.replicated == ()
    # parameters split over fsdp x tensor (replicated over data: data parallelism); only norm scales stay whole
    assert report.per_device_bytes < 1.02 * report.total_bytes / (mesh.shape["fsdp"] * mesh.shape["tensor"])
    # optimiser moments are sharded like their parameters, the step counter replicated
    assert placement.state.step.spec == P()
    replicate_all = [[name, []] for name, _ in cfg.mesh.logical_axis_rules]
    bad = apply_overrides(cfg, [f"mesh.logical_axis_rules={json.dumps(replicate_all)}"])
    with pytest.raises(ConfigError, match="large parameter.*replicated on all .* devices.*hash_tok_embedding"):
        plan_train_state(bad.model, tx, mesh, bad.mesh.rules, bad.mesh.min_sharded_param_bytes)


def test_blt_d_presets_and_tpu_topologies():
    for size in ("1b", "3b"):
        for block in (4, 8, 16):
            cfg = get_preset(f"fast-blt-{size}-d{block}")
            assert cfg.model.diffusion.block_size == block
            assert cfg.model.global_model == get_preset(f"fast-blt-{size}").model.global_model
    assert tpu_topology_args("v5p-256")["topology_name"] == "v5:4x4x8"  # 128 chips
    assert tpu_topology_args("v6e-256")["topology_name"] == "v6e:16x16"
    assert tpu_topology_args("v4-8")["topology_name"] == "v4:2x2x1"
    with pytest.raises(ConfigError, match="v5p"):
        tpu_topology_args("v5p-6")
    with pytest.raises(ConfigError, match="accelerator type"):
        tpu_topology_args("h100-8")


def test_distributed_settings_are_complete_or_refused(monkeypatch):
    for var in ("BLT_COORDINATOR", "BLT_NUM_PROCESSES", "BLT_PROCESS_ID", "BLT_LOCAL_CPU_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    assert not DistributedConfig.from_env().explicit
    monkeypatch.setenv("BLT_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("BLT_NUM_PROCESSES", "4")
    cfg = DistributedConfig.from_env(process_id=3)  # flags complete what the environment leaves out
    cfg.validate()
    assert (cfg.coordinator, cfg.num_processes, cfg.process_id) == ("10.0.0.1:1234", 4, 3)
    with pytest.raises(DistributedError, match="process_id not given"):
        DistributedConfig.from_env().validate()
    with pytest.raises(DistributedError, match="out of range"):
        DistributedConfig.from_env(process_id=4).validate()
    monkeypatch.setenv("BLT_NUM_PROCESSES", "four")
    with pytest.raises(DistributedError, match="BLT_NUM_PROCESSES='four'"):
        DistributedConfig.from_env()


def _initialize_in_child(queue):
    # a complete multi-process setting that would block for a missing peer, were the guard not there
    cfg = DistributedConfig(coordinator="127.0.0.1:9", num_processes=2, process_id=0, initialization_timeout=5)
    queue.put(distributed.initialize(cfg))


def test_data_loader_workers_never_join_the_cluster():
    """grain's workers are spawned children that re-import the entry module; initialize() skips them."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_initialize_in_child, args=(queue,))
    child.start()
    assert queue.get(timeout=120) is False
    child.join(timeout=60)
    assert child.exitcode == 0


def _run(cmd, env=None, timeout=900):
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "spmd_partitioner" not in ln]
    assert proc.returncode == 0, "\n".join(lines[-80:])
    return proc


def test_eight_device_checks(tiny_runs):
    """tests/multidevice_checks.py in a child with 8 CPU devices: sharded train steps == one device, restore
    onto 4 devices, sharded generation == unsharded, the AOT memory report."""
    _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--numprocesses=0",
          "tests/multidevice_checks.py"],
         env={"JAX_NUM_CPU_DEVICES": "8", "BLT_TINY_BLT_RUN": str(tiny_runs[3])})


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp") / "data"
    prepare.prepare_corpus(str(root), [str(STDLIB / "json")])
    return root


def _train_cmd(store, run, stop_after):
    # one global and one decoder layer: the distributed machinery is under test, not depth (compiles faster)
    sets = ["model.patching.mode=static", "model.global_model.n_layers=1", "model.decoder.n_layers=1",
            "data.batch_size=8", "train.steps=4", "train.warmup_steps=1", "train.log_every=1",
            "train.checkpoint_every=1", "train.eval_batches=1"]
    cmd = [sys.executable, "-m", "blt_jax", "train", "--preset", "tiny", "--store", str(store), "--run", str(run),
           "--no-progress", "--stop-after", str(stop_after)]
    return cmd + [a for s in sets for a in ("--set", s)]


def _launch(cmd, processes, devices):
    return _run([sys.executable, str(REPO / "launch" / "local.py"), "--num-processes", str(processes),
                 "--devices-per-process", str(devices), "--timeout", "600", "--", *cmd])


def test_two_processes_train_like_one_and_checkpoints_move_between_process_counts(small_store, tmp_path):
    """One process (2 devices) trains 4 steps. Another run trains steps 1-2 in two processes (2 devices
    each, real jax.distributed over gloo), step 3 in one process (restoring the two-process checkpoint onto
    2 devices) and step 4 in two processes again (1 device each): every step's loss equals the first run's."""
    _launch(_train_cmd(small_store, tmp_path / "one", 4), 1, 2)
    _launch(_train_cmd(small_store, tmp_path / "mixed", 2), 2, 2)
    _launch(_train_cmd(small_store, tmp_path / "mixed", 3), 1, 2)
    _launch(_train_cmd(small_store, tmp_path / "mixed", 4), 2, 1)
    one = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "one", "train")}
    mixed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "mixed", "train")}
    assert sorted(one) == sorted(mixed) == [1, 2, 3, 4]
    for step in one:
        assert mixed[step] == pytest.approx(one[step], rel=1e-5), step
    # the two-process checkpoints hold one data-iterator state per process
    states = sorted(p.name for p in (tmp_path / "mixed" / "checkpoints" / "2" / "data_iter").glob("process_*"))
    assert states == ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu: pip install 'jax[tpu]'")
def test_aot_compiles_the_1b_train_step_for_a_tpu_pod():
    proc = _run([sys.executable, "-m", "blt_jax", "aot", "--preset", "fast-blt-1b", "--topology", "v5p-256"],
                env={"JAX_PLATFORMS": "cpu"}, timeout=3600)
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["devices"] == 128 and report["device_kind"].startswith("TPU v5")
    assert 0 < report["train_state_per_device_gib"] < report["peak_per_device_gib"]
