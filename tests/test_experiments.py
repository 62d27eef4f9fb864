"""The experiment scripts' bookkeeping: FLOP-matched plans, cached runs, reductions against BLT (no training)."""

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import common  # noqa: E402
import generation_cost  # noqa: E402
import scaling  # noqa: E402

from blt_jax import flops  # noqa: E402
from blt_jax.config import ConfigError, get_preset  # noqa: E402


@pytest.mark.parametrize("size", ["scaling-s", "scaling-l", "fast-blt-1b"])
def test_every_variant_trains_on_the_same_flops(size):
    base = get_preset(size)
    plans = {p.variant: p for p in scaling.plan_size(base, list(scaling.VARIANTS), entropy_patch_length=4.3)}
    assert list(plans) == list(scaling.VARIANTS)
    budget = plans["entropy"].train_bytes * plans["entropy"].flops_per_byte
    assert plans["entropy"].steps == base.train.steps
    bytes_per_step = base.data.batch_size * base.data.seq_len
    for p in plans.values():  # within half a step of the budget (steps are whole)
        assert abs(p.train_bytes * p.flops_per_byte - budget) <= 0.5 * bytes_per_step * p.flops_per_byte
        assert p.cfg.data == base.data  # the same windows, so the same held-out evaluation
    # the byte baseline is the global model's shape over bytes: more FLOPs per byte, fewer bytes
    byte = plans["byte"]
    assert byte.kind == "entropy" and byte.cfg.entropy_train.steps == byte.steps
    g = base.model.global_model
    assert dataclasses.replace(byte.cfg.model.entropy_model.stack, window=g.window) == g
    assert byte.flops_per_byte == flops.train_flops_per_byte(byte.cfg.model.entropy_model, base.data.seq_len)
    # static 8 costs fewer FLOPs per byte than static 4, so it sees more bytes; BLT-D costs more than BLT
    assert plans["static-8"].cfg.model.patching.mode == "static" and plans["static-8"].cfg.model.patching.patch_size == 8
    assert plans["static-8"].train_bytes > plans["static-4"].train_bytes
    for b in (4, 8, 16):
        d = plans[f"d-{b}"]
        assert d.cfg.model.diffusion.block_size == b and d.cfg.model.patching == base.model.patching
        assert d.flops_per_byte > plans["entropy"].flops_per_byte
    assert plans["d-16"].train_bytes < plans["d-4"].train_bytes < plans["entropy"].train_bytes


def test_cached_run_reuses_its_result_and_refuses_another_config(tmp_path):
    cfg = get_preset("tiny")
    calls = []
    fit = lambda: calls.append(1) or {"bpb": 1.5}  # noqa: E731
    assert common.cached_run(tmp_path / "r", cfg, fit) == {"bpb": 1.5}
    assert common.cached_run(tmp_path / "r", cfg, fit) == {"bpb": 1.5}
    assert len(calls) == 1
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=21))
    with pytest.raises(ConfigError, match="another configuration"):
        common.cached_run(tmp_path / "r", other, fit)


def test_reductions_are_against_blt_and_equal_outputs_are_flagged():
    def row(setting, model, method, gb, bps, outputs):
        return {"task": "t", "setting": setting, "model": model, "kwargs": {"method": method},
                "eq8_gb_per_seq": gb, "bytes_per_s": bps, "outputs": outputs}

    rows = [row("BLT (AR)", "blt", "ar", 2.0, 100.0, ["abc"]),
            row("BLT-S k=8", "blt", "s", 1.0, 150.0, ["abc"]),
            row("BLT-D-4 AR", "d-4", "ar", 2.0, 90.0, ["abd"]),
            row("BLT-DV-4 one step", "d-4", "dv", 1.5, 120.0, ["abd"]),
            row("BLT-D-4 a=0.5", "d-4", "d", 0.5, 300.0, ["xyz"])]
    generation_cost.add_reductions(rows)
    assert [r["eq8_reduction_pct"] for r in rows] == [0.0, 50.0, 0.0, 25.0, 75.0]
    assert [r["speed_vs_blt"] for r in rows] == [1.0, 1.5, 0.9, 1.2, 3.0]
    assert [r["same_output_as_ar"] for r in rows] == [True, True, True, True, False]


def test_generation_settings_are_the_papers():
    labels = [s.label for s in generation_cost.settings()]
    assert labels[:4] == ["BLT (AR)", "BLT-S k=4", "BLT-S k=8", "BLT-S k=16"]
    assert len(labels) == 4 + 3 * 9
    dv = [s for s in generation_cost.settings() if s.kwargs["method"] == "dv"]
    assert {(s.kwargs["unmask"].rule, s.kwargs["unmask"].alpha, s.kwargs["unmask"].gamma) for s in dv if
            s.kwargs["block_size"] == 8} == {("confidence", 0.3, 1.0), ("entropy", 0.7, 1.5), ("entropy", 0.7, 2.0),
                                            ("one_step", 0.7, 1.0)}
