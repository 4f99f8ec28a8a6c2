"""--algo loha | lokr | dora | oft: LyCORIS's LoHa, LoKr and diag-OFT and kohya's DoRA trained, saved in the
kohya/LyCORIS layout (A1111, ComfyUI and sdtune read it), resumed exactly; the layers themselves are checked against what the saved
adapter applies in test_train_lora."""

import json

import pytest
import torch
from safetensors import safe_open

from sdtune.cli import main
from sdtune.lora import algos
from sdtune.lora.algos.lokr import split
from sdtune.lora.formats import load_lora
from sdtune.lora.patch import LoraSet
from sdtune.models import load_base
from sdtune.safeio import load_state, read_metadata
from sdtune.tiny import world
from sdtune.train import loop


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    scenes = world.concept_scenes(4, seed=5, style="outline")
    return world.write_dataset(tmp_path_factory.mktemp("data"), scenes, template=None, with_style=False)


def train(dataset, out, *flags):
    return main(["train", "lora", "--model", "tiny-random", "--data", str(dataset), "--out", str(out), "--steps", "4",
                 "--batch-size", "2", "--rank", "4", "--alpha", "2", "--lr", "1e-2", "--targets", "all",
                 "--conv-rank", "2", "--text-encoder", "--save-every", "2", "--sample-every", "0", "--no-report",
                 "--no-progress", *flags])


def test_split_factorises_widths_as_lycoris_does():
    # LyCORIS's own table (factorization's docstring), and a factor that divides the width taken as it is
    assert [split(d) for d in (127, 128, 250, 512, 1024)] == [(1, 127), (8, 16), (10, 25), (16, 32), (32, 32)]
    assert [split(d, 4) for d in (127, 128, 250, 512)] == [(1, 127), (4, 32), (2, 125), (4, 128)]
    assert [split(d, 8) for d in (250, 360, 1024)] == [(5, 50), (8, 45), (8, 128)]


# each algorithm's file keys, its LyCORIS network record, and the factor that starts at zero (so moved by training)
LAYOUTS = {"loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}, {"algo": "loha"}, ("w2a",)),
           "lokr": ({"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}, {"algo": "lokr", "factor": "-1"},
                    ("w2", "w2b")),
           "dora": ({"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"}, {"algo": "locon", "dora_wd": "True"},
                    ("up",)),
           "oft": ({"oft_blocks", "alpha"}, {"algo": "diag-oft", "constraint": "2.0"}, ("blocks",)),
           "ia3": ({"weight", "on_input"}, {"algo": "ia3"}, ("scale",)),
           "full": ({"diff", "diff_b"}, {"algo": "full"}, ("diff",))}


@pytest.mark.parametrize("algo", list(LAYOUTS))
def test_a_lycoris_run_saves_its_layout_and_resumes_to_the_uninterrupted_weights(dataset, tmp_path, algo):
    assert train(dataset, tmp_path / "whole", "--algo", algo) == 0
    path = tmp_path / "whole" / "lora.safetensors"
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    suffixes = {k.split(".", 1)[1] for k in keys}
    want, network, zero_start = LAYOUTS[algo]
    assert suffixes == want, suffixes  # (LoKr: w2 split on the wide layers, whole on the narrow ones)
    assert {k.split("_", 2)[1] for k in keys} == {"unet", "te"}  # lora_unet_..., lora_te_...
    meta = read_metadata(path)
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_dim"] == "4"
    args = json.loads(meta["ss_network_args"])
    assert args == {**network, "conv_dim": "2", "conv_alpha": "2.0"}, args
    lora = load_lora(path)
    assert {ad.kind for _, _, ad in lora.items()} == {algos.get(algo).name}  # (full: LyCORIS's files say diff)
    for comp, p, ad in lora.items():  # every layer moved from the base: its factor that starts at zero trained
        assert any(ad.tensors[r].abs().max() > 0 for r in zero_start if r in ad.tensors), (comp, p)

    cut = tmp_path / "cut"
    assert train(dataset, cut, "--algo", algo, "--steps", "2") == 0  # the first half, then the whole run again
    state, _ = load_state(cut / loop.STATE_FILE)
    assert state["step"] == 2 and any(k.endswith(f".{zero_start[0]}") for k in state["trainable"])
    assert train(dataset, cut, "--algo", algo) == 0
    resumed = load_lora(cut / "lora.safetensors")
    for (comp, p, a), (_, _, b) in zip(lora.items(), resumed.items(), strict=True):
        assert a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[r], b.tensors[r]) for r in a.tensors), (comp, p)


def test_lokr_factor_shapes_the_small_factor(dataset, tmp_path):
    assert train(dataset, tmp_path, "--algo", "lokr", "--lokr-factor", "4", "--steps", "1") == 0
    lora = load_lora(tmp_path / "lora.safetensors")
    for _, path, ad in lora.items():
        out, inner = ad.tensors["w1"].shape
        assert out <= 4 and inner <= 4, (path, ad.tensors["w1"].shape)
    assert json.loads(read_metadata(tmp_path / "lora.safetensors")["ss_network_args"])["factor"] == "4"


def test_boft_run_saves_butterfly_blocks_as_lycoris_and_a_conversion_keeps_them(dataset, tmp_path):
    assert train(dataset, tmp_path, "--algo", "oft", "--oft-butterfly", "--steps", "2") == 0
    path = tmp_path / "lora.safetensors"
    lora = load_lora(path)
    q = lora.modules["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]  # 32 = 8 blocks of 4
    assert q.tensors["blocks"].shape == (4, 8, 4, 4) and q.alpha == 2.0
    assert {ad.algo.lycoris_label(ad.tensors) for _, _, ad in lora.items()} == {"BOFT"}
    assert any(ad.tensors["blocks"].abs().max() > 0 for _, _, ad in lora.items())  # learned (from zero)
    assert json.loads(read_metadata(path)["ss_network_args"])["algo"] == "boft"
    assert main(["convert", str(path), str(tmp_path / "again.safetensors"), "--to", "kohya"]) == 0
    assert json.loads(read_metadata(tmp_path / "again.safetensors")["ss_network_args"])["algo"] == "boft"


def test_oft_rescaled_saves_a_rescale_per_layer_and_records_it(dataset, tmp_path):
    assert train(dataset, tmp_path, "--algo", "oft", "--oft-rescaled", "--steps", "2") == 0
    path = tmp_path / "lora.safetensors"
    lora = load_lora(path)
    assert {frozenset(ad.tensors) for _, _, ad in lora.items()} == {frozenset({"blocks", "rescale"})}
    assert any(not torch.equal(ad.tensors["rescale"], torch.ones_like(ad.tensors["rescale"]))
               for _, _, ad in lora.items())  # learned (from 1)
    assert json.loads(read_metadata(path)["ss_network_args"])["rescaled"] == "True"


def test_lokr_options_shape_every_layer_and_are_recorded_as_lycoris_names_them(dataset, tmp_path):
    """--lokr-full-matrix: every layer's two factors whole (scale 1); --lokr-decompose-both --lokr-unbalanced at
    rank 1: both split, w1 holding the output's larger factor (to_q's 32 = 4 x 8: 8); each in ss_network_args."""
    runs = {"full": (["--lokr-full-matrix"], {"w1", "w2"}, {"full_matrix": "True"}),
            "both": (["--lokr-decompose-both", "--lokr-unbalanced", "--rank", "1", "--conv-rank", "1"],
                     {"w1a", "w1b", "w2a", "w2b"}, {"decompose_both": "True", "unbalanced_factorization": "True"})}
    for name, (flags, roles, args) in runs.items():
        assert train(dataset, tmp_path / name, "--algo", "lokr", "--steps", "2", *flags) == 0
        path = tmp_path / name / "lora.safetensors"
        lora = load_lora(path)
        assert {frozenset(ad.tensors) for _, _, ad in lora.items()} == {frozenset(roles)}, name
        recorded = json.loads(read_metadata(path)["ss_network_args"])
        assert {k: recorded.get(k) for k in args} == args and recorded["algo"] == "lokr"
        if name == "full":
            assert {ad.scale for _, _, ad in lora.items()} == {1.0}
        else:
            q = lora.modules["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
            assert q.tensors["w1a"].shape == (8, 1) and q.tensors["w2a"].shape == (4, 1) and q.scale == 2.0


# the roles of a run's 3x3 convolutions with --tucker (LyCORIS's file names)
TUCKER_KEYS = {"lora": {"lora_down.weight", "lora_mid.weight", "lora_up.weight", "alpha"},
               "loha": {"hada_t1", "hada_t2", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
               "lokr": {"lokr_t2", "lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
               "dora": {"lora_down.weight", "lora_mid.weight", "lora_up.weight", "dora_scale", "alpha"}}


@pytest.mark.parametrize("algo", list(TUCKER_KEYS))
def test_tucker_and_scalar_runs_save_lycoris_files_and_resume_exactly(dataset, tmp_path, algo):
    """--tucker --scalar: the resnets' 3x3 convolutions saved with their cores, the scalars folded in (no key of
    their own), LyCORIS's record of both (a LoRA's too: algo=locon), and a cut run resumes to the same file
    (DoRA's with LyCORIS's dropouts on)."""
    flags = ["--algo", algo, "--tucker", "--scalar",
             *(["--rank-dropout", "0.2", "--module-dropout", "0.1"] if algo == "dora" else [])]
    assert train(dataset, tmp_path / "whole", *flags) == 0
    path = tmp_path / "whole" / "lora.safetensors"
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    conv = {k.split(".", 1)[1] for k in keys if k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.")}
    assert conv == TUCKER_KEYS[algo], conv
    assert not any("scalar" in k for k in keys)
    meta = read_metadata(path)
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert args["algo"] == {"lora": "locon", "dora": "locon"}.get(algo, algo)
    assert args["use_tucker"] == args["use_scalar"] == "True"
    lora = load_lora(path)
    assert all(torch.isfinite(t).all() and t.abs().max() > 0 for _, _, ad in lora.items() for t in ad.tensors.values())

    cut = tmp_path / "cut"
    assert train(dataset, cut, *flags, "--steps", "2") == 0
    state, _ = load_state(cut / loop.STATE_FILE)
    assert any(k.endswith(".scalar") for k in state["trainable"])
    assert train(dataset, cut, *flags) == 0
    resumed = load_lora(cut / "lora.safetensors")
    for (comp, p, a), (_, _, b) in zip(lora.items(), resumed.items(), strict=True):
        assert all(torch.equal(a.tensors[r], b.tensors[r]) for r in a.tensors), (comp, p)


@pytest.mark.parametrize("targets, resnets", [("attn+ff", False), ("all", True)])  # (attn+ff without convolutions)
def test_train_norm_saves_the_unets_norm_changes_beside_the_algorithms_and_resumes(dataset, tmp_path, capsys,
                                                                                   targets, resnets):
    """--train-norm: w_norm/b_norm for the transformers' norms (attn+ff) and the resnets' (all), none for the
    text encoder (outside the modules LyCORIS targets there), all learned; LyCORIS's record; a cut run resumes to
    the same file, and the file continues only with --train-norm."""
    flags = ["--targets", targets, "--train-norm", *([] if resnets else ["--conv-rank", "0"])]
    assert train(dataset, tmp_path / "whole", *flags) == 0
    path = tmp_path / "whole" / "lora.safetensors"
    lora = load_lora(path)
    norms = {(comp, p) for comp, p, ad in lora.items() if ad.kind == "norm"}
    assert {comp for comp, _ in norms} == {"unet"}
    assert any(p.endswith("transformer_blocks.0.norm3") for _, p in norms)
    assert any(".resnets." in p for _, p in norms) == resnets
    assert all(ad.tensors["weight"].abs().max() > 0 and ad.tensors["bias"].abs().max() > 0
               for _, _, ad in lora.items() if ad.kind == "norm")
    meta = read_metadata(path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["train_norm"] == "True"
    assert {ad.kind for _, _, ad in lora.items()} == {"lora", "norm"}

    cut = tmp_path / "cut"
    assert train(dataset, cut, *flags, "--steps", "2") == 0
    assert train(dataset, cut, *flags) == 0
    resumed = load_lora(cut / "lora.safetensors")
    for (comp, p, a), (_, _, b) in zip(lora.items(), resumed.items(), strict=True):
        assert all(torch.equal(a.tensors[r], b.tensors[r]) for r in a.tensors), (comp, p)
    if resnets:
        return
    assert train(dataset, tmp_path / "more", *flags, "--network-weights", str(path), "--steps", "1") == 0
    capsys.readouterr()
    assert train(dataset, tmp_path / "plain", "--targets", targets, "--conv-rank", "0", "--network-weights",
                 str(path)) == 2
    assert "holds changes to norm layers (LyCORIS's train_norm), which this run does not train; add --train-norm" \
        in capsys.readouterr().err


def test_lycoris_refusals_are_one_line(dataset, tmp_path, capsys):
    for flags, said in ((["--algo", "loha", "--formats", "kohya", "diffusers"],
                         "--algo loha --formats diffusers: diffusers has no layout for LyCORIS's LoHa"),
                        (["--algo", "lokr", "--lokr-factor", "0"], "--lokr-factor 0: must be -1"),
                        (["--lokr-full-matrix"], "--lokr-full-matrix: an option of --algo lokr (LoKr's), and this "
                                                 "run trains --algo lora; add --algo lokr or leave it out"),
                        (["--algo", "lokr", "--lokr-full-matrix", "--lokr-decompose-both"], "; choose one"),
                        (["--algo", "lora", "--dora-wd-on-output"], "--dora-wd-on-output: an option of --algo dora"),
                        (["--algo", "dora", "--formats", "diffusers"], "add --dora-wd-on-output, or use --formats "
                                                                        "kohya"),
                        (["--algo", "loha", "--oft-butterfly"],
                         "--oft-butterfly: an option of --algo oft (OFT's), and this run trains --algo loha"),
                        (["--algo", "dora", "--formats", "diffusers"],
                         "--algo dora --formats diffusers: sdtune trains kohya's DoRA (a magnitude per input column"),
                        (["--algo", "dora", "--lora-dropout", "0.1"], "--algo dora --lora-dropout 0.1: DoRA computes"),
                        (["--algo", "oft", "--formats", "diffusers"], "diffusers has no layout for LyCORIS's OFT"),
                        (["--algo", "oft", "--scale-weight-norms", "1"], "OFT's change is no product of factors"),
                        (["--algo", "oft", "--rs-lora"], "OFT's --alpha is its constraint"),
                        (["--algo", "oft", "--conv-rank", "1"], "--algo oft --conv-rank 1: OFT's blocks would be 1 x 1"),
                        (["--algo", "oft", "--rank", "1"], "--algo oft --rank 1: OFT's blocks would be 1 x 1, which turn nothing; give 2"),
                        (["--algo", "lora", "--alpha", "0"], "--alpha 0.0: must be greater than 0"),
                        (["--algo", "oft", "--alpha", "-1"], "--alpha -1.0: must be 0 or more (--algo oft: its"),
                        (["--algo", "boft"], "--algo 'boft': choose one of lora, loha, lokr, dora, oft, ia3"),
                        (["--algo", "lora", "--ia3-on-input"], "--ia3-on-input: an option of --algo ia3 (IA3's)"),
                        (["--algo", "ia3", "--rs-lora"], "--algo ia3 --rs-lora: IA3 has no alpha or rank"),
                        (["--algo", "ia3", "--formats", "diffusers"], "diffusers has no layout for LyCORIS's IA3"),
                        (["--algo", "full", "--formats", "diffusers"], "diffusers has no layout for LyCORIS's full"),
                        (["--algo", "oft", "--tucker"], "--tucker: an option of --algo lora, loha, lokr or dora, and this "
                                                        "run trains --algo oft; add --algo lora or leave it out"),
                        (["--algo", "loha", "--tucker", "--conv-rank", "0", "--targets", "attn"],
                         "--tucker: Tucker cores shape the 3x3 convolutions' change, and this run trains none; add "
                         "--conv-rank N (or --targets all)"),
                        (["--train-norm", "--targets", "attn", "--conv-rank", "0"],
                         "--train-norm: --targets attn holds no norm layer of the UNet"),
                        (["--train-norm", "--formats", "diffusers"], "--train-norm --formats diffusers: diffusers "
                                                                     "has no layout for LyCORIS's norm-layer")):
        assert train(dataset, tmp_path / "out", *flags) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and said in err, err
        assert not (tmp_path / "out").exists()


def test_an_sdxl_lokr_writes_both_encoders_keys_and_applies_to_every_layer(dataset, tmp_path):
    assert main(["train", "lora", "--model", "tiny-xl-random", "--data", str(dataset), "--out", str(tmp_path),
                 "--steps", "1", "--rank", "4", "--alpha", "4", "--lr", "1e-2", "--algo", "lokr", "--text-encoder",
                 "--sample-every", "0", "--no-report", "--no-progress"]) == 0
    path = tmp_path / "lora.safetensors"
    with safe_open(path, "pt") as f:
        assert {k.split("_", 2)[1] for k in f.keys()} == {"unet", "te1", "te2"}  # lora_unet_, lora_te1_, lora_te2_
    assert read_metadata(path)["ss_base_model_version"] == "sdxl_base_v1-0"
    base = load_base("tiny-xl-random")
    before = {c: {k: v.clone() for k, v in getattr(base, c).state_dict().items()}
              for c in ("unet", "text_encoder", "text_encoder_2")}
    loras = LoraSet.attach(base)
    try:
        loras.add("x", path, 1.0)  # every module of the file matched a layer (else it is refused)
        for comp, weights in before.items():
            now = getattr(base, comp).state_dict()
            assert any(not torch.equal(now[k], v) for k, v in weights.items()), comp
    finally:
        loras.detach()
