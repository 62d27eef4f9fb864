"""Training: loss falls, resume loses nothing (model, optimiser and data iterator), mismatched checkpoints
are refused clearly, and a model trained on random bytes cannot beat chance (no label leak)."""

import dataclasses
import json

import numpy as np
import pytest

from blt_jax import prepare
from blt_jax.cli import main
from blt_jax.config import ConfigError
from blt_jax.evaluate import unigram_bpb
from blt_jax.data import pipeline
from blt_jax.train import checkpoint as ckpt
from blt_jax.train.checkpoint import load_trained_params
from blt_jax.train.loop import check_overrides, train
from blt_jax.train.metrics import read_metrics
from conftest import STDLIB, tiny_config


def test_loss_falls_for_entropy_model_and_blt(tiny_runs):
    _, _, entropy_run, blt_run = tiny_runs
    for run in (entropy_run, blt_run):
        rows = read_metrics(run, "train")
        first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
        assert last < first - 0.5, (run, first, last)
        held = read_metrics(run, "heldout")[-1]
        assert held["bits_per_byte"] < unigram_bpb(tiny_runs[1])  # learned more than byte frequencies


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tiny_runs, tmp_path):
    """A run stopped at step 5 and resumed reaches the same losses, step for step, as one never stopped:
    the model, the optimiser state and the data iterator all come back exactly."""
    cfg, _, _, _ = tiny_runs
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=9, checkpoint_every=100))
    train("blt", cfg, tmp_path / "straight", progress=False)
    crashed = train("blt", cfg, tmp_path / "resumed", progress=False, stop_after=5)
    assert crashed["interrupted"] and crashed["step"] == 5
    resumed = train("blt", cfg, tmp_path / "resumed", progress=False)
    assert resumed["resumed_from"] == 5
    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight", "train")}
    b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed", "train")}
    assert sorted(b) == list(range(1, 10))
    for step in range(6, 10):
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-6), step


def test_checkpoint_of_a_different_model_is_refused(tiny_runs):
    cfg, _, _, blt_run = tiny_runs
    other = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, global_model=dataclasses.replace(cfg.model.global_model, n_layers=3)))
    with pytest.raises(ckpt.CheckpointMismatch, match="model.global_model.n_layers"):
        train("blt", other, blt_run, progress=False)
    with pytest.raises(ckpt.CheckpointMismatch, match="entropy"):
        train("entropy", cfg, blt_run, progress=False)
    with pytest.raises(ckpt.CheckpointMismatch, match="global_model"):
        load_trained_params(blt_run, expect_kind="blt", model_cfg=other.model)
    em = cfg.model.entropy_model
    deeper = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, entropy_model=dataclasses.replace(
        em, stack=dataclasses.replace(em.stack, n_layers=em.stack.n_layers + 1))))
    with pytest.raises(ckpt.CheckpointMismatch, match="model.entropy_model.stack.n_layers"):
        ckpt.check_compatible(tiny_runs[2], "entropy", deeper)


def test_a_run_written_before_a_config_field_existed_still_resumes(tiny_runs, tmp_path):
    """Fields added later compare at their defaults: how the older run behaved."""
    blt_run = tiny_runs[3]
    cfg = ckpt.load_run_config(blt_run)[1]  # the run's own config (its calibrated threshold included)
    meta = json.loads((blt_run / "run.json").read_text())
    del meta["config"]["model"]["diffusion"]
    (tmp_path / "run.json").write_text(json.dumps(meta))
    ckpt.check_compatible(tmp_path, "blt", cfg)  # no error
    blt_d = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, diffusion=dataclasses.replace(cfg.model.diffusion, block_size=4)))
    with pytest.raises(ckpt.CheckpointMismatch, match="model.diffusion.block_size is 0 there but 4 now"):
        ckpt.check_compatible(tmp_path, "blt", blt_d)


def test_corrupt_run_metadata_is_a_clear_error(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"format_version": 99, "kind": "blt", "config": {}}))
    with pytest.raises(ckpt.CheckpointMismatch, match="format version"):
        ckpt.read_run_meta(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a blt_jax run"):
        ckpt.read_run_meta(tmp_path / "missing")


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare.prepare_corpus(str(tmp_path / "store"), [str(tmp_path / "empty")])


# ---- no label leak ------------------------------------------------------------------------------------------

def _random_bytes_store(tmp_path) -> str:
    rng = np.random.default_rng(0)
    docs = tmp_path / "random"
    docs.mkdir()
    for i in range(12):
        (docs / f"r{i:02d}.bin").write_bytes(rng.integers(1, 256, 20_000, dtype=np.uint8).tobytes())
    root = str(tmp_path / "store")
    prepare.prepare_corpus(root, [str(docs)], heldout_fraction=0.2)
    return root


def _train_on_random_bytes(tmp_path, name: str) -> float:
    root = _random_bytes_store(tmp_path) if not (tmp_path / "store").exists() else str(tmp_path / "store")
    cfg = tiny_config(root, "model.patching.mode=\"static\"", "model.patching.patch_size=4",
                      "model.patching.max_patch_length=None", "train.steps=150", "train.learning_rate=3e-3",
                      "train.warmup_steps=10", "train.eval_batches=8", "train.checkpoint_every=1000")
    return train("blt", cfg, tmp_path / name, progress=False)["heldout"]["bits_per_byte"]


def test_random_bytes_stay_at_chance_and_a_leak_would_show(tmp_path, monkeypatch):
    """Random bytes carry no information, so held-out bits/byte clearly below 8 means the model saw its
    targets. The same run with a deliberate off-by-one in the data pipeline (each target equals its input)
    goes far below chance, so this test can fail. (Leaks through the cross-attention rule are caught
    structurally: decoder-id and causality tests in test_patching / test_model.)"""
    honest = _train_on_random_bytes(tmp_path, "honest")
    assert honest > 7.9, honest

    real = pipeline.PatchedWindows.map

    def off_by_one(self, element):
        return dict(real(self, element), targets=element["tokens"][:-1])

    monkeypatch.setattr(pipeline.PatchedWindows, "map", off_by_one)
    leaked = _train_on_random_bytes(tmp_path, "leaky")
    assert leaked < honest - 0.7, (honest, leaked)


def test_a_rerun_of_a_finished_run_logs_its_heldout_row_once(tiny_runs, tmp_path):
    """A probe: every rerun of a finished `blt train` evaluated again and appended another held-out row for
    the last step (the README: after a resume metrics.jsonl holds each step once)."""
    cfg, _, _, _ = tiny_runs
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2, warmup_steps=1, checkpoint_every=100))
    first = train("blt", cfg, tmp_path / "run", progress=False)
    again = train("blt", cfg, tmp_path / "run", progress=False)
    assert again["resumed_from"] == again["step"] == 2 and again["heldout"] == pytest.approx(first["heldout"])
    assert [r["step"] for r in read_metrics(tmp_path / "run", "heldout")] == [2]


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tiny_runs, tmp_path):
    """A probe: a batch larger than the held-out split failed with the data source's repr and left run.json,
    metrics and an entropy copy behind, which `eval` then took for a run that stopped before its first save."""
    cfg, root, _, _ = tiny_runs
    big = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=4096))
    with pytest.raises(ValueError, match=r"its heldout split holds \d+ window\(s\) of .* fewer than one batch of 4096"):
        train("blt", big, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def test_an_entropy_run_refuses_train_overrides_and_records_the_schedule_it_trains(tmp_path, capsys):
    """A probe: `blt train --what entropy --set train.steps=10` checked train.* and trained the preset's
    entropy_train.steps, while run.json said train.steps=10. The entropy model trains with entropy_train.*:
    a train.* override is refused naming the field to set, and the section that is used is the one checked."""
    root = str(tmp_path / "data")
    prepare.prepare_corpus(root, [str(STDLIB / "json")])
    run = tmp_path / "ent"
    entropy = ["train", "--what", "entropy", "--preset", "tiny", "--store", root, "--run", str(run), "--no-progress"]
    assert main([*entropy, "--set", "train.steps=3", "--set", "train.seed=1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "blt train: error: train.steps: the entropy model trains with entropy_train.*, not train.*; "
        "use --set entropy_train.steps=3")
    assert not run.exists()
    assert main([*entropy, "--set", "entropy_train.steps=1"]) == 2  # tiny's entropy warmup is 2 steps
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "blt train: error: entropy_train.warmup_steps: must lie in [0, steps=1], got 2")

    assert main([*entropy, "--set", "entropy_train.steps=3", "--set", "entropy_train.seed=1",
                 "--set", "entropy_train.eval_batches=1"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["step"] == 3
    assert [r["step"] for r in read_metrics(run, "train")][-1] == 3
    recorded = json.loads((run / "run.json").read_text())["config"]
    assert recorded["entropy_train"]["steps"] == 3 and recorded["entropy_train"]["seed"] == 1


def test_only_an_entropy_run_refuses_train_overrides():
    check_overrides("blt", ["train.steps=3", "entropy_train.steps=3"])  # --what blt accepts both, as before
    check_overrides("entropy", ["entropy_train.steps=3", "data.seed=1", "model.entropy_model.stack.n_layers=2"])
    with pytest.raises(ConfigError, match=r'^train: .* use --set entropy_train=\{"steps": 3\}$'):
        check_overrides("entropy", ['train={"steps": 3}'])  # the whole section too
