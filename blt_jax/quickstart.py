"""`blt quickstart`: the whole pipeline on the embedded corpus, each stage resumable.

prepare tokens -> train the entropy model -> precompute entropies -> calibrate the patching threshold ->
train a BLT -> held-out bits per byte (next to a unigram baseline) -> a generated sample.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Sequence

from blt_jax import model as model_lib
from blt_jax import prepare
from blt_jax.config import RunConfig
from blt_jax.data import store
from blt_jax.evaluate import unigram_bpb
from blt_jax.generation import api
from blt_jax.train.loop import train

# The training split is capped so the entropy pass over it fits the quickstart's time budget; the
# held-out split (about 200 KB of whole files) is always complete.
QUICKSTART_TRAIN_BYTES = 3_000_000
SAMPLE_PROMPT = ('import os\nimport sys\n\n\ndef read_config(path):\n'
                 '    """Read a configuration file and return a dict."""\n    with open(path) as f:\n')


def _stage(name: str) -> float:
    print(f"\n== {name}", flush=True)
    return time.time()


def _interrupted(report: dict) -> dict:
    print("\ninterrupted: the last checkpoint is saved; run the same command again to resume")
    report["interrupted"] = True
    return report


def run_quickstart(cfg: RunConfig, out: Path, data: Optional[Sequence[str]] = None, progress: bool = True,
                   max_train_bytes: Optional[int] = QUICKSTART_TRAIN_BYTES) -> dict:
    """`data`: the user's files/folders instead of the embedded corpus (then used whole)."""
    t_all = time.time()
    out.mkdir(parents=True, exist_ok=True)
    corpus_paths = data
    data = str(out / "data")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=data))
    report: dict = {"preset": cfg.name, "seconds": {}}

    t = _stage("1/6 prepare the corpus" + ("" if corpus_paths else
                                           " (embedded: CPython's standard library source and docs)"))
    try:
        manifest = store.read_manifest(data)
    except FileNotFoundError:
        manifest = prepare.prepare_corpus(data, corpus_paths, max_train_bytes=None if corpus_paths else max_train_bytes)
    print(f"{manifest['corpus']}\ntrain {manifest['train']['num_tokens']:,} tokens in {manifest['train']['num_docs']} "
          f"files; held-out {manifest['heldout']['num_tokens']:,} tokens in {manifest['heldout']['num_docs']} files")
    report["seconds"]["prepare"] = time.time() - t

    t = _stage("2/6 train the entropy model (a small causal byte LM)")
    ent = train("entropy", cfg, out / "entropy", progress=progress)
    if ent["interrupted"]:
        return _interrupted(report)
    report["entropy_model"] = {"params": model_lib.param_counts(cfg.model.entropy_model)["entropy_model"],
                               "heldout_bits_per_byte": ent["heldout"]["bits_per_byte"]}
    print(f"entropy model held-out: {ent['heldout']['bits_per_byte']:.3f} bits/byte")
    report["seconds"]["entropy_model"] = time.time() - t

    t = _stage("3/6 precompute entropies and calibrate the patching threshold")
    manifest = store.read_manifest(data)
    if manifest.get("entropy_run") != str((out / "entropy").absolute()) or manifest.get("patching_threshold") is None:
        prepare.add_entropies(data, out / "entropy", progress=progress)
        prepare.calibrate(data, cfg.model.patching, cfg.data.seq_len)
        manifest = store.read_manifest(data)
    report["patching"] = {"threshold": manifest["patching_threshold"],
                          "heldout_mean_patch_length": manifest["patching_achieved"]}
    print(f"threshold {manifest['patching_threshold']:.4f} nats -> mean patch length "
          f"{manifest['patching_achieved']:.2f} bytes on held-out windows (target {manifest['patching_target']})")
    report["seconds"]["entropies_and_calibration"] = time.time() - t

    t = _stage("4/6 train the BLT")
    blt = train("blt", cfg, out / "blt", progress=progress)
    if blt["interrupted"]:
        return _interrupted(report)
    counts = model_lib.param_counts(cfg.model)
    report["blt"] = {"params": counts, "heldout": blt["heldout"], "train": blt.get("last_train", {})}
    report["seconds"]["blt"] = time.time() - t

    t = _stage("5/6 held-out evaluation")
    report["unigram_bits_per_byte"] = unigram_bpb(data)
    print(f"BLT held-out: {blt['heldout']['bits_per_byte']:.3f} bits/byte "
          f"(mean patch length {blt['heldout'].get('mean_patch_length', float('nan')):.2f}); "
          f"unigram baseline: {report['unigram_bits_per_byte']:.3f} bits/byte")
    report["seconds"]["eval"] = time.time() - t

    model = api.load(str(out / "blt"))
    method = "d" if model.cfg.diffusion.enabled else "ar"  # a BLT-D samples by block diffusion
    t = _stage(f"6/6 generate (top-p sampling, method {method})")
    result = api.generate(model, [SAMPLE_PROMPT], max_new_bytes=200, method=method,
                          sampling=api.SamplingConfig(temperature=1.0, top_p=0.95), seed=0)[0]
    print(result.prompt + result.text)
    calls = result.cost["decoder_calls"] / max(result.cost["new_bytes"], 1)
    print(f"({result.cost['new_bytes']} bytes, {calls:.2f} decoder calls per byte)")
    report["sample"] = {"prompt": result.prompt, "text": result.text, "method": method, "cost": result.cost}
    report["seconds"]["generate"] = time.time() - t

    report["seconds"]["total"] = time.time() - t_all
    (out / "summary.json").write_text(json.dumps(report, indent=2, default=float))
    non_hash = counts["encoder"] + counts["global"] + counts["decoder"]
    print("\n== summary")
    print(f"BLT: {counts['total_blt'] / 1e6:.1f}M parameters ({non_hash / 1e6:.2f}M without hash tables)")
    print(f"held-out bits/byte: BLT {blt['heldout']['bits_per_byte']:.3f}, entropy model "
          f"{ent['heldout']['bits_per_byte']:.3f}, unigram {report['unigram_bits_per_byte']:.3f}")
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in report["seconds"].items()))
    print(f"report: {out / 'summary.json'}; runs: {out / 'entropy'}, {out / 'blt'}")
    return report
