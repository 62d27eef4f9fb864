"""Released-weight interop, checked numerically against transformers itself (torch CPU, offline models):
import -> same patches and logits; greedy generation equals transformers' generate; export -> transformers
reloads it bit for bit."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from blt_jax import convert
from blt_jax.cli import main
from blt_jax.config import ConfigError, get_preset
from blt_jax.generation import api
from blt_jax.generation.forward import compute_patch_starts, forward
from blt_jax.generation.sampling import SamplingConfig
from blt_jax.patching import patch_ids, patch_lengths
from blt_jax.train import checkpoint as ckpt
from test_samplers import prompts, random_model

torch = pytest.importorskip("torch", reason="install the test extra: pip install -e '.[test]'")
torch.set_num_threads(1)

VARIANTS = {
    "reference": hf_models.variant(),
    "global-projection-gqa": hf_models.variant(global_config={"hidden_size": 192, "num_key_value_heads": 2}),
    "encoder-cross-all-layers": hf_models.variant(
        encoder_config={"num_hidden_layers": 2, "cross_attn_all_layers": True},
        decoder_config={"cross_attn_all_layers": False, "num_key_value_heads": 2}),
    "max-patch-length": hf_models.variant(max_patch_length=4),
    "hash-sizes": hf_models.variant(encoder_hash_byte_group_size=[3, 5, 8], encoder_hash_byte_group_vocab=509,
                                    encoder_hash_byte_group_nb_functions=2),
    "byte-patches": hf_models.variant(patch_in_forward=False, local_attention_window_len=16),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request, tmp_path_factory):
    name = request.param
    base = tmp_path_factory.mktemp(f"hf-{name}")
    hf = hf_models.build(VARIANTS[name], seed=1)
    hf_models.save(hf, base / "hf")
    assert main(["convert", "--from-hf", str(base / "hf"), str(base / "ours")]) == 0
    return name, hf, api.load(str(base / "ours")), base


def ours_forward(model, ids):
    tokens = jnp.asarray(ids, jnp.int32)
    fn = jax.jit(lambda p, t: forward(model.spec, p, t, lengths=jnp.full((1,), t.shape[1]))[0])
    starts = compute_patch_starts(model.spec, model.all_params(), tokens, jnp.full((1,), tokens.shape[1]))
    ids_ = patch_ids(starts, tokens.shape[1] + 1)
    lengths = np.asarray(patch_lengths(ids_, tokens.shape[1] + 1))[0, : int(ids_.num_patches[0])]
    return np.asarray(fn(model.all_params(), tokens)), lengths


def test_patches_and_logits_match_transformers(converted):
    name, hf, model, _ = converted
    for prompt in (hf_models.PROMPT, b"def f(x):\n    return x * 2  # doubled\n" * 3):
        ids = hf_models.prompt_ids(prompt)
        want_logits, want_lengths = hf_models.hf_forward(hf, ids)
        got_logits, got_lengths = ours_forward(model, ids)
        if want_lengths is not None:
            assert got_lengths.tolist() == want_lengths[0].tolist(), name
            assert 3 < len(got_lengths) < ids.shape[1], "patches should have mixed lengths"
        np.testing.assert_allclose(got_logits, want_logits, atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("name", ["reference", "max-patch-length"])
def test_greedy_generation_equals_transformers_generate(name, tmp_path):
    hf = hf_models.build(VARIANTS[name], seed=2)
    hf_models.save(hf, tmp_path / "hf")
    convert.import_hf(tmp_path / "hf", tmp_path / "ours")
    ids = hf_models.prompt_ids()
    want = hf_models.hf_greedy(hf, ids, 64)[0]
    ours = api.load(str(tmp_path / "ours"))
    # transformers splits long patches after the fact, which is not incremental at the newest byte: that
    # variant runs without caches only (cached generation refuses it, tested in test_samplers)
    methods = ["ar-nocache"] if name == "max-patch-length" else ["ar-nocache", "ar"]
    for method in methods:
        got = api.generate(ours, [hf_models.PROMPT], max_new_bytes=64, method=method,
                           sampling=SamplingConfig(allow_specials=True), stop_at_eos=False)[0]
        assert got.cost["new_bytes"] == 64, method
        assert got.token_ids == want.tolist(), method


def test_export_reloads_in_transformers_bit_for_bit(converted, tmp_path):
    name, hf, _, base = converted
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    assert main(["convert", "--to-hf", str(base / "ours"), str(tmp_path / "exported")]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ids = hf_models.prompt_ids()
    a, _ = hf_models.hf_forward(hf, ids)
    b, _ = hf_models.hf_forward(again, ids)
    assert np.array_equal(a, b), name


def test_unsupported_config_values_are_refused_by_name():
    with pytest.raises(convert.UnsupportedConfig, match="global_config.hidden_act"):
        convert.config_from_hf(hf_models.variant(global_config={"hidden_act": "gelu"}))
    with pytest.raises(convert.UnsupportedConfig, match="rope_type"):
        convert.config_from_hf(hf_models.variant(
            decoder_config={"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}))
    with pytest.raises(convert.UnsupportedConfig, match="tie_word_embeddings"):
        convert.config_from_hf(hf_models.variant(tie_word_embeddings=True))


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    hf = hf_models.build(hf_models.variant(), seed=0)
    hf_models.save(hf, tmp_path / "hf")
    hf_cfg, tensors = convert.read_hf_folder(tmp_path / "hf")
    wrong = convert.config_from_hf(hf_models.variant(global_config={"intermediate_size": 700}))
    with pytest.raises(convert.UnsupportedConfig, match="global_transformer.layers.0.mlp"):
        convert.params_from_hf(wrong, tensors)


def test_eval_of_an_imported_model_asks_for_a_store(converted, capsys):
    """A probe: `blt eval` on an imported model blamed a store path "relative to the directory it was trained
    from"; an import was never trained and has no store (its data.path is the config's default)."""
    name, _, _, base = converted
    if name != "reference":
        pytest.skip("one variant shows it")
    assert main(["eval", "--checkpoint", str(base / "ours")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "imported from transformers" in err and "pass --store" in err, err


def test_a_blt_d_run_keeps_its_diffusion_settings_through_export_and_import(tmp_path):
    """A probe: a BLT-D run exported with `blt convert --to-hf` and imported back lost diffusion.block_size
    (transformers has no field for it), silently: the import could no longer run --method d/dv with it. The
    export records it under config.json's `blt_jax` key, which transformers keeps and ignores. A second probe:
    with max_patch_length the import also got transformers' patch splitting, which the cached methods refuse,
    so it could not run --method d at all; the export now carries its patching too."""
    model = random_model(block_size=4)  # max_patch_length 5, as every fast-blt preset sets one
    run = tmp_path / "run"
    ckpt.write_run_meta(run, "blt", dataclasses.replace(get_preset("tiny"), model=model.cfg))
    ckpt.save_params(run / "params", model.params)
    ckpt.save_params(run / "entropy_model", model.entropy_params)
    assert main(["convert", "--to-hf", str(run), str(tmp_path / "hf")]) == 0
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = api.load(str(tmp_path / "back"))
    ps = prompts(4, seed=3)
    want = api.generate(model, ps, max_new_bytes=16, method="d", stop_at_eos=False)
    assert [r.token_ids for r in api.generate(back, ps, max_new_bytes=16, method="d", stop_at_eos=False)] == \
        [r.token_ids for r in want]
    # the same model; only the patch slots are the import's own (sized for its 1024-byte evaluation window)
    assert back.cfg == dataclasses.replace(model.cfg, patching=dataclasses.replace(model.cfg.patching,
                                                                                   max_patches=1025))
    assert api.method_config(back, "dv").block_size == 4
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["blt_jax"] == {"patching": dataclasses.asdict(model.cfg.patching), "document_masking": True,
                                 "diffusion": dataclasses.asdict(model.cfg.diffusion)}
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # still loads in transformers
    # bad values are refused by name
    with pytest.raises(ConfigError, match=r"^blt_jax\.diffusion\.block_size: must be"):
        convert.config_from_hf({**hf_cfg, "blt_jax": {"diffusion": {"block_size": -1}}})
    with pytest.raises(convert.UnsupportedConfig, match=r"^blt_jax\.diffusion\.blocks: not a diffusion setting"):
        convert.config_from_hf({**hf_cfg, "blt_jax": {"diffusion": {"blocks": 4}}})


@pytest.mark.parametrize("name", ["tiny", "quickstart", "blt-1b", "fast-blt-1b", "fast-blt-1b-d8", "tiny-bytes"])
def test_an_export_imports_back_as_the_same_config(name):
    """A probe: `config_from_hf(config_to_hf(cfg))` gave a native model transformers' patching and attention
    (patch splitting, no document starts or masking, 256 patch slots), and failed on a byte-patched run's
    null threshold."""
    cfg = get_preset(name.removesuffix("-bytes")).model
    if name.endswith("-bytes"):
        cfg = dataclasses.replace(cfg, patching=dataclasses.replace(cfg.patching, mode="byte"))
    if cfg.global_model.window is not None:  # transformers' global model has no window: export refuses it
        with pytest.raises(convert.UnsupportedConfig, match=r"^model\.global_model\.window"):
            convert.config_to_hf(cfg)
        cfg = dataclasses.replace(cfg, global_model=dataclasses.replace(cfg.global_model, window=None))
    assert convert.config_from_hf(json.loads(json.dumps(convert.config_to_hf(cfg)))) == cfg


def test_a_transformers_checkpoint_keeps_transformers_semantics_through_export_and_import():
    """A config.json without the `blt_jax` key (made by transformers, or by a blt_jax before it carried the
    patching) imports with transformers' patching; exported again, the import says so explicitly, so a second
    import is the same model (before, it relied on the second import guessing the same)."""
    for hf_cfg in (hf_models.variant(max_patch_length=4),
                   hf_models.variant(max_patch_length=4, blt_jax={"diffusion": {"block_size": 4}})):
        cfg = convert.config_from_hf(hf_cfg)
        assert cfg.patching.drop_trailing_patch and not cfg.patching.document_starts and not cfg.document_masking
        again = convert.config_to_hf(cfg)
        assert again["blt_jax"]["patching"]["drop_trailing_patch"] and not again["blt_jax"]["document_masking"]
        assert convert.config_from_hf(again) == cfg


def test_carried_patching_that_is_bad_or_disagrees_is_refused_in_one_line():
    cfg = random_model(block_size=4).cfg
    hf_cfg = json.loads(json.dumps(convert.config_to_hf(cfg)))
    patching = hf_cfg["blt_jax"]["patching"]
    cases = [({"blt_jax": {**hf_cfg["blt_jax"], "patching": {**patching, "max_patch_length": 0}}},
              r"blt_jax\.patching\.max_patch_length: must be None or >= 1"),
             ({"blt_jax": {**hf_cfg["blt_jax"], "patching": {**patching, "drop_trailing": True}}},
              r"blt_jax\.patching\.drop_trailing: not a patching setting"),
             ({"blt_jax": {**hf_cfg["blt_jax"], "document_masking": "yes"}},
              r"blt_jax\.document_masking: expected true/false"),
             ({"blt_jax": {**hf_cfg["blt_jax"], "tokenizer": {}}}, r"blt_jax\.tokenizer: not a setting"),
             ({"max_patch_length": 8}, r"blt_jax\.patching\.max_patch_length: the exported run's 5 disagrees"),
             ({"patching_threshold": 2.0}, r"blt_jax\.patching\.threshold: the exported run's 3\.5 disagrees")]
    for change, message in cases:
        with pytest.raises(convert.UnsupportedConfig, match=f"^{message}") as e:
            convert.config_from_hf({**hf_cfg, **change})
        assert "\n" not in str(e.value)
