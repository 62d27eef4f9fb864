"""The experiment scripts' bookkeeping: FLOP-matched plans, reused rows and runs, the reports' verdicts, the
GPU recipe's time planning, and the generation-cost table on a tiny model."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import best_models  # noqa: E402
import claims  # noqa: E402
import common  # noqa: E402
import generation_cost  # noqa: E402
import gpu_run  # noqa: E402
import scaling  # noqa: E402
import sizes  # noqa: E402

from blt_jax import flops  # noqa: E402
from blt_jax.config import ConfigError, DiffusionConfig, get_preset  # noqa: E402
from blt_jax.generation.loaded import from_params  # noqa: E402
from blt_jax.model import build  # noqa: E402


def size_base(size):
    if size in sizes.STUDY:
        return sizes.study_config(size), sizes.STUDY[size].budget_flops
    return get_preset(size), None


@pytest.mark.parametrize("size", ["cpu-s", "cpu-xl", "fast-blt-1b"])
def test_every_variant_trains_on_the_same_flops(size):
    base, budget = size_base(size)
    plans = {p.variant: p for p in scaling.plan_size(size, base, list(scaling.VARIANTS), 4.3, budget)}
    assert list(plans) == list(scaling.VARIANTS)
    if budget is None:  # a preset: its entropy BLT's own schedule is the budget
        assert plans["entropy"].steps == base.train.steps
        budget = scaling.preset_budget(base, 4.3)
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
    static8 = plans["static-8"].cfg.model.patching
    assert static8.mode == "static" and static8.patch_size == 8
    assert plans["static-8"].train_bytes > plans["static-4"].train_bytes
    for b in (4, 8, 16):
        d = plans[f"d-{b}"]
        assert d.cfg.model.diffusion.block_size == b and d.cfg.model.patching == base.model.patching
        assert d.flops_per_byte > plans["entropy"].flops_per_byte
    assert plans["d-16"].train_bytes < plans["d-4"].train_bytes < plans["entropy"].train_bytes


def test_the_study_grows_and_trains_past_the_first_steps():
    """Budgets rise with the model; every run of the study takes at least 100 steps (the previous study's
    33-117 steps measured the first seconds of training) and reads no more than the training split."""
    budgets = [s.budget_flops for s in sizes.STUDY.values()]
    assert budgets == sorted(budgets) and budgets[0] >= 3e12
    params = [scaling.non_embedding_params("blt", sizes.study_config(n)) for n in sizes.STUDY]
    assert params == sorted(params)
    for plan in scaling.make_plans(list(sizes.STUDY), list(scaling.VARIANTS), "", None):
        assert plan.steps >= 100, (plan.size, plan.variant)
        assert plan.train_bytes < 12e6


def test_rows_are_reused_only_for_the_same_config_and_store():
    base = sizes.study_config("cpu-s", "/somewhere/data")
    plan = scaling.plan_size("cpu-s", base, ["entropy"], 4.0, 3e12)[0]
    moved = scaling.plan_size("cpu-s", sizes.study_config("cpu-s", "/elsewhere/data"), ["entropy"], 4.0, 3e12)[0]
    longer = scaling.plan_size("cpu-s", base, ["entropy"], 4.0, 6e12)[0]
    store = {"train_tokens": 12_000_000, "heldout_tokens": 200_000, "threshold": 1.5, "corpus": "c"}
    fp = scaling.fingerprint(plan, store)
    assert scaling.fingerprint(moved, store) == fp  # where the store lives does not matter
    assert scaling.fingerprint(longer, store) != fp
    assert scaling.fingerprint(plan, {**store, "train_tokens": 3_000_000}) != fp  # the 3 MB subset is another store


def test_a_saved_row_takes_its_training_rate_from_its_runs_log(tmp_path):
    """The study's "train B/s" is the median over the run's logged intervals, also for rows saved with their
    last interval's rate (which showed 16 B/s for a run that trained at ~1,900)."""
    run = common.run_dir(tmp_path, "cpu-m", "entropy")
    run.mkdir(parents=True)
    records = [{"split": "train", "bytes_per_second": r} for r in (1900.0, 1950.0, 16.0)] + [{"split": "heldout"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    saved = {"size": "cpu-m", "variant": "entropy", "bytes_per_second": 16.0}
    assert scaling.with_logged_rate(saved, tmp_path)["bytes_per_second"] == 1900.0
    assert scaling.with_logged_rate({**saved, "variant": "byte"}, tmp_path) == {**saved, "variant": "byte"}


def row(size, variant, flops_, bpb):
    return {"size": size, "variant": variant, "train_flops": flops_, "heldout_bpb": bpb, "params_non_embedding": 1e6,
            "train_flops_per_byte": 1e6, "steps": 100, "train_bytes": 1e6, "mean_patch_length": 4.0, "seconds": 1.0}


def test_scaling_report_says_where_curves_cross_and_checks_the_unigram_margin():
    rows = [row("a", "byte", 1e12, 3.0), row("a", "entropy", 1e12, 3.2), row("a", "static-8", 1e12, 3.1),
            row("b", "byte", 1e13, 2.6), row("b", "entropy", 1e13, 2.4), row("b", "static-8", 1e13, 2.3)]
    lines = "\n".join(scaling.crossing_lines(rows))
    assert "**byte vs entropy** (bpb of byte minus entropy: a -0.200, b +0.200): the curves cross between a and b" \
        in lines
    assert "static-8 vs entropy" in lines and "static-8 is below entropy at every budget" in lines
    env = {"device": "cpu", "cpus": 2}
    md = scaling.markdown(rows, planned=8, unigram=4.9, env=env, trained_seconds=6.0)
    assert "In progress: 6 of 8 runs finished" in md
    assert "every model is below the unigram baseline, by 2.30 bits/byte or more" in md
    md = scaling.markdown(rows[:3] + [row("b", "byte", 1e13, 5.0)], planned=4, unigram=4.9, env=env,
                          trained_seconds=1.0)
    assert "In progress" not in md and "byte did not get below the unigram baseline" in md


def test_claims_are_read_from_the_result_files(tmp_path):
    rows = [row(s, v, f, b) for s, f, bpbs in (("a", 1e12, (3.0, 3.2, 3.3, 3.4, 3.5, 3.1, 3.2)),
                                                ("b", 1e13, (2.6, 2.4, 2.5, 2.6, 2.7, 2.3, 2.45)))
            for v, b in zip(("byte", "entropy", "d-4", "d-8", "d-16", "static-8", "static-4"), bpbs, strict=True)]

    def gen(setting, model, method, cut, speed, same=True, acc=None, **kw):
        return {"task": "continuation", "setting": setting, "model": model, "method": method, "score": 10.0,
                "eq8_reduction_pct": cut, "eq8_reduction_pct_paper": None, "speed_vs_blt": speed,
                "same_output_as_ar": same, "acceptance": acc, "kwargs": kw, "new_bytes_per_output": 128.0,
                "global_nfe": 128.0 / kw.get("block_size", 1), "global_nfe_paper": None}

    generation = [gen("BLT (AR)", "blt", "ar", 0.0, 1.0), gen("BLT-S k=4", "blt", "s", 20.0, 1.2, acc=0.9, draft_len=4),
                  gen("BLT-S k=8", "blt", "s", 30.0, 1.3, acc=0.95, draft_len=8),
                  gen("BLT-D-4 a=0.7", "d-4", "d", 55.0, 1.5, block_size=4),
                  gen("BLT-D-8 a=0.7", "d-8", "d", 45.0, 1.9, block_size=8)]
    table = claims.render({"scaling": {"rows": rows}, "generation_cost": {"rows": generation}})
    assert table.count("\n") == len(claims.CLAIMS) + 1  # a header, its rule and one row per claim
    assert "| entropy BLT vs byte transformer, bpb: a: 3.200 vs 3.000, b: 2.400 vs 2.600 | holds from b on |" in table
    assert "b: entropy 2.400 vs static-4 2.450 bpb | holds |" in table
    assert "BLT-D-4 55.0%, BLT-D-8 45.0% | does not hold everywhere" in table
    assert "continuation: k=4 90.0%, k=8 95.0% | does not hold (acceptance does not fall steadily)" in table
    assert "FLOP-matched (b): BLT 2.400, D-4 2.500, D-8 2.600, D-16 2.700 bpb | holds" in table
    assert "pending (`diversity.py`)" in table  # no diversity results given
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{claims.BEGIN}\nold\n{claims.END}\nrest\n")
    claims.write_readme(table, readme)
    assert readme.read_text() == f"intro\n{claims.BEGIN}\n{table}\n{claims.END}\nrest\n"


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


def test_best_models_share_one_shape_and_schedule_and_report_only_finished_runs(tmp_path):
    cfgs = {n: sizes.best_config(n, "/data") for n in sizes.BEST}
    strip = lambda c: dataclasses.replace(c, name="", model=dataclasses.replace(c.model, diffusion=DiffusionConfig()))  # noqa: E731
    assert len({strip(c).to_json() for c in cfgs.values()}) == 1  # they differ only in the BLT-D block
    assert [c.model.diffusion.block_size for c in cfgs.values()] == [0, 8, 4, 16]
    assert cfgs["blt"].data.seq_len >= 1024  # few-shot translation prompts and continuations fit the window
    run = best_models.run_path(tmp_path, "d-8")
    assert best_models.row_for("d-8", tmp_path, "/data")["finished"] is False
    run.mkdir(parents=True)
    # two sessions: the second's first interval is slow (shared machine); the time is the median rate's
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 250, "split": "train", "bits_per_byte": 2.3, "bytes_per_second": 1000.0},
        {"step": 275, "split": "train", "bits_per_byte": 2.25, "bytes_per_second": 1200.0},
        {"step": 300, "split": "train", "bits_per_byte": 2.2, "bytes_per_second": 200.0}]))
    assert best_models.row_for("d-8", tmp_path, "/data")["progress_step"] == 300
    result = {"heldout": {"bits_per_byte": 2.1, "mean_patch_length": 4.1}, "seconds": 3600.0,
              "last_train": {"bytes_per_second": 900.0, "masked_accuracy": 0.3}}
    (run.parent / "result.json").write_text(json.dumps({"config": json.loads(cfgs["d-8"].to_json()), "result": result}))
    r = best_models.row_for("d-8", tmp_path, "/data")
    assert r["finished"] and r["heldout_bpb"] == 2.1 and r["masked_accuracy"] == 0.3
    # a resumed run's result.json holds its last session's seconds only: the report uses every session's rate
    assert r["bytes_per_second"] == 1000.0 and r["seconds"] == r["train_bytes"] / 1000.0
    assert best_models.row_for("blt", tmp_path, "/data")["finished"] is False  # another model's result is not its


def test_gpu_ladder_points_fit_the_time_left():
    assert gpu_run.plan_point(1e16, flops_per_s=1e14, compile_s=30, seconds_left=200) == (1e16, "")
    budget, note = gpu_run.plan_point(1e16, flops_per_s=1e14, compile_s=30, seconds_left=80)
    assert budget == pytest.approx(5e15) and "shrunk" in note
    budget, note = gpu_run.plan_point(1e17, flops_per_s=1e14, compile_s=30, seconds_left=80)
    assert budget == 0.0 and "skipped" in note
    # the 1B shape of the ladder is the Fast BLT 1B model's (global 2048 x 25, decoder 9 layers)
    top = sizes.gpu_ladder_config("gpu-l").model
    paper = get_preset("fast-blt-1b").model
    assert (top.global_model.dim, top.global_model.n_layers, top.decoder.n_layers, top.encoder.dim) == \
        (paper.global_model.dim, paper.global_model.n_layers, paper.decoder.n_layers, paper.encoder.dim)


@pytest.mark.slow
def test_gpu_run_smoke_runs_every_phase_end_to_end(tmp_path):
    """`gpu_run.py --smoke`: the MFU step, a tiny BLT-D-8 ladder point trained and evaluated, generation on it as
    AR, BLT-S and BLT-D; and an existing result is not overwritten."""
    out = subprocess.run([sys.executable, str(EXPERIMENTS / "gpu_run.py"), "--smoke", "--minutes", "20",
                          "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_run.json").read_text())
    assert report["mfu"]["model_flops_per_second"] > 0 and report["mfu"]["compute_dtype"] == "bfloat16"
    (point,) = report["ladder"]  # --smoke trains the BLT-D-8 twin alone
    assert point["name"] == "smoke-s-d8" and point["block_size"] == 8
    assert 0 < point["heldout_bpb"] < 20 and point["steps_done"] == point["steps"] and not point["stopped_at_deadline"]
    (rows,) = report["generation"].values()
    assert [r["name"] for r in rows] == ["ar", "s k=8", "d-8 a=0.7"]
    assert all(r["bytes_per_s"] > 0 for r in rows) and rows[1]["acceptance"] is not None
    assert "## Generation" in (tmp_path / "out" / "gpu_run.md").read_text()
    assert (tmp_path / "out" / "gpu_run.png").exists()
    again = subprocess.run([sys.executable, str(EXPERIMENTS / "gpu_run.py"), "--smoke", "--out",
                            str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # an existing result is kept


def fake_result(new_bytes: int, **cost):
    return SimpleNamespace(new_bytes=b"x" * new_bytes, cost={"new_bytes": new_bytes, "drafted": 0, "accepted": 0,
                                                              **cost})


def test_cost_rows_use_the_paper_accounting_when_the_engine_reports_it():
    s = generation_cost.Setting("blt", "BLT-S k=8", {"method": "s", "draft_len": 8})
    old = [fake_result(10, decoder_calls=12, global_calls=3, eq8_bandwidth_gb=1.0) for _ in range(2)]
    r = generation_cost.summarize(s, "t", old, 2.0, {"score": 1.0})
    assert r["eq8_gb"] == 1.0 and r["eq8_gb_paper"] is None and r["rounds"] is None  # absent: shown as "-"
    new = [fake_result(10, decoder_calls=12, global_calls=3, eq8_bandwidth_gb=1.0, eq8_bandwidth_gb_paper=g,
                       rounds=n, paper_global_calls=2 * n) for g, n in ((1.5, 3), (2.5, 5))]
    r = generation_cost.summarize(s, "t", new, 2.0, {"score": 1.0})
    assert r["eq8_gb_paper"] == 2.0 and r["rounds"] == 4.0 and r["global_nfe_paper"] == 8.0
    assert r["bytes_per_s"] == 10.0 and r["bytes_per_decoder_pass"] is None  # only BLT-D commits cells
    d = generation_cost.Setting("d-4", "BLT-D-4 a=0.7", {"method": "d"})
    r = generation_cost.summarize(d, "t", [fake_result(12, decoder_calls=7, global_calls=3, eq8_bandwidth_gb=1.0)],
                                  1.0, {"score": 1.0})
    assert r["bytes_per_decoder_pass"] == 2.0  # 12 bytes over 6 passes after the prefill


def test_blt_d_verdict_states_the_margin_and_why():
    def r(setting, model, method, score, per_pass=None):
        return {"task": "t", "setting": setting, "model": model, "method": method, "score": score,
                "bytes_per_decoder_pass": per_pass}

    rows = [r("BLT-D-8 AR", "d-8", "ar", 20.0), r("BLT-D-8 a=0.7", "d-8", "d", 19.0, 1.8),
            r("BLT-D-4 AR", "d-4", "ar", 20.0), r("BLT-D-4 a=0.7", "d-4", "d", 10.0, 1.05)]
    lines = generation_cost.blt_d_verdicts(rows, margin=0.1)
    assert "BLT-D-8 a=0.7: 19.00 against 20.00" in lines[0] and "within 10% of it" in lines[0]
    assert "**not** within 10%" in lines[1] and "commits 1.05 bytes per pass" in lines[1]


@pytest.mark.slow  # three sampler compiles: ~70 s of CPU
def test_generation_cost_table_on_a_tiny_model():
    """One row of each family (BLT, BLT-S, BLT-D) on a randomly initialised tiny BLT-D-4, which also decodes as
    a BLT: the table's reductions, equal-output flags and per-pass column come out of real cost records."""
    cfg = get_preset("tiny").model
    cfg = dataclasses.replace(cfg, patching=dataclasses.replace(cfg.patching, mode="static", patch_size=4),
                              diffusion=dataclasses.replace(cfg.diffusion, block_size=4))
    model = from_params(cfg, build(cfg, seed=0)[1])
    task = generation_cost.Task("continuation", ["def f(x):\n    return x", "import os\nimport sys\n"], 12,
                                lambda outs: {"score": float(sum(o.count(" ") for o in outs))}, "spaces")
    chosen = {s.label: s for s in generation_cost.settings([4])}
    # the BLT-D row on the same weights as the "blt" rows, so its own AR row is BLT (AR)
    chosen = [chosen["BLT (AR)"], chosen["BLT-S k=4"], dataclasses.replace(chosen["BLT-D-4 a=0.7"], model="blt")]
    rows = [generation_cost.run_setting(model, s, task, repeats=1) for s in chosen]
    generation_cost.add_reductions(rows)
    ar, s, d = rows
    assert ar["eq8_reduction_pct"] == 0.0 and ar["speed_vs_blt"] == 1.0 and ar["acceptance"] is None
    assert s["same_output_as_ar"] and s["acceptance"] is not None  # greedy BLT-S reproduces AR exactly
    assert s["decoder_nfe"] > ar["decoder_nfe"] * 0.5 and s["global_nfe"] is not None
    assert d["bytes_per_decoder_pass"] > 0 and ar["bytes_per_decoder_pass"] is None
    assert all(r["new_bytes_per_output"] == 12 for r in rows)
    md = generation_cost.markdown(rows, [task], margin=0.1)
    assert all(r["setting"] in md for r in rows) and "BLT-D at α = 0.7 against its own AR output" in md
