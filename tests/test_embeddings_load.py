"""Loading many embeddings at once, as users do: a stored token that is not one word falls back to the file
name (as A1111 does), and one file that cannot be used is skipped with a warning instead of stopping the rest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from sdtune import add_embeddings, load_base
from sdtune.console import SdtuneWarning
from sdtune.ti.formats import load_embedding

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ti"
SPACED = "<Le Petit Prince-moon >"  # the token stored in a real sd-concepts-library learned_embeds.bin


def spaced_file(root: Path, width: int) -> Path:
    folder = root / "le-petit-prince-moon"
    folder.mkdir(parents=True)
    torch.save({SPACED: torch.full((width,), 0.5)}, folder / "learned_embeds.bin")
    return folder / "learned_embeds.bin"


def test_spaced_token_falls_back_to_the_folder_name(tmp_path):
    path = spaced_file(tmp_path, 768)
    with pytest.warns(SdtuneWarning, match=r"'<Le Petit Prince-moon >' is not one word.*'le-petit-prince-moon'"):
        emb = load_embedding(path)
    assert emb.token == "le-petit-prince-moon" and torch.equal(emb.vectors, torch.full((1, 768), 0.5))
    renamed = load_embedding(path, token="<moon>")  # SRC:TOKEN still renames, with nothing to warn about
    assert renamed.token == "<moon>"


def test_a1111_name_with_spaces_falls_back_to_the_file_name(tmp_path):
    path = tmp_path / "soft light.pt"
    torch.save({"string_to_param": {"*": torch.ones(2, 768)}, "name": "soft light", "string_to_token": {"*": 265}},
               path)
    with pytest.warns(SdtuneWarning, match="soft-light"):
        assert load_embedding(path).token == "soft-light"


def wide_base():
    """The tiny model with an SD 1.x-wide (768) one-layer text encoder: real embeddings fit it, quickly."""
    base = load_base("tiny-random")
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=256, num_hidden_layers=1,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    base.text_encoder = CLIPTextModel(config)
    return base


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"real embedding fixtures not found at {FIXTURES}")
def test_real_embeddings_load_together_and_odd_ones_are_skipped(tmp_path):
    sd1 = {"mayaru_bestconfig__bad-hands-5.pt": "bad-hands-5",
           "mayaru_bestconfig__EasyNegative.safetensors": "mayaru_bestconfig__EasyNegative",
           "fastai_diffusion-nbs__learned_embeds.bin": "<birb-style>",
           "ttekcor_Embedding_sd__learned_embeds.safetensors": "<detail-schemas>"}
    odd = ["HK200202_emojii__embeddings.pti", "Birch-san_stable-diffusion__embeddings.pt",
           "monsterhunters__nfixer.pt"]  # SDXL, an unsafe pickle, SD 2.x (1024 wide)
    specs = [str(FIXTURES / name) for name in [*sd1, *odd]] + [str(spaced_file(tmp_path, 768))]
    base = wide_base()
    with pytest.warns(SdtuneWarning) as caught:
        loaded = add_embeddings(base, specs)
    assert loaded == [*sd1.values(), "le-petit-prince-moon"]
    skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(skipped) == len(odd) and all(any(name in m for m in skipped) for name in odd)
    assert any("made for SDXL (clip_l 768 and clip_g 1280 wide), but this model is SD 1.x" in m for m in skipped)
    table = base.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[base.embeddings.ids("le-petit-prince-moon")], torch.full((1, 768), 0.5))
    assert torch.equal(table[base.embeddings.ids("bad-hands-5")], load_embedding(FIXTURES / next(iter(sd1))).vectors)


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"real embedding fixtures not found at {FIXTURES}")
def test_sdxl_base_loads_sdxl_embeddings_and_skips_sd1_ones():
    base = load_base("sdxl-small-random")
    sdxl = {"Kaleidia__SDXL-Detail.safetensors": "Kaleidia__SDXL-Detail",
            "HK200202_emojii__embeddings.pti": "HK200202_emojii__embeddings",
            "roettger_XLTI__myPuppet768.pt": "my-puppet"}
    specs = [str(FIXTURES / "mayaru_bestconfig__bad-hands-5.pt"),
             *(str(FIXTURES / name) + (":my-puppet" if name.endswith(".pt") else "") for name in sdxl)]
    with pytest.warns(SdtuneWarning) as caught:
        loaded = add_embeddings(base, specs)
    assert loaded == list(sdxl.values())
    assert [str(w.message) for w in caught] == [
        f"{specs[0]}: embedding made for SD 1.x (768 wide), but this model is SDXL (clip_l 768 and clip_g 1280 wide); "
        f"use an embedding made for this model (skipped)"]
    puppet = load_embedding(FIXTURES / "roettger_XLTI__myPuppet768.pt")
    ids = base.embeddings.ids("my-puppet")
    assert ids == base.embeddings.ids("my-puppet", "clip_g") == [49412]
    assert torch.equal(base.text_encoder.get_input_embeddings().weight[ids], puppet.vectors["clip_l"])
    assert torch.equal(base.text_encoder_2.get_input_embeddings().weight[ids], puppet.vectors["clip_g"])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sdtune.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_embedding_named_but_unusable_stops_with_one_line(tmp_path):
    """A file the user named (``--embedding``) is not skipped as a folder's odd file is: images drawn without it
    would be wrong and cost the run."""
    save_file({"emb_params": torch.randn(2, 64)}, tmp_path / "zqshiny.safetensors")
    save_file({"emb_params": torch.randn(2, 768)}, tmp_path / "wide.safetensors")  # SD 1.x, not the tiny model
    spaced = spaced_file(tmp_path, 64)
    args = ["generate", "--model", "tiny-random", "--prompt", "zqshiny le-petit-prince-moon", "--steps", "1",
            "--no-progress", "--out", str(tmp_path / "out"), "--embedding", str(tmp_path / "zqshiny.safetensors")]
    r = run_cli(*args, "--embedding", str(tmp_path / "wide.safetensors"), "--embedding", str(spaced))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith(f"sdtune: error: {tmp_path / 'wide.safetensors'}") and "768 wide" in r.stderr
    assert not list((tmp_path / "out").glob("*.png"))
    r = run_cli(*args, "--embedding", str(spaced))  # the usable ones: the stored token's fallback is one note
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdtune: warning: ") and "le-petit-prince-moon" in lines[0]
    assert r.stdout.strip().endswith(".png")


def test_cli_missing_embedding_stops_with_one_line(tmp_path):
    r = run_cli("generate", "--model", "tiny-random", "--prompt", "x", "--steps", "1", "--no-progress",
                "--out", str(tmp_path), "--embedding", str(tmp_path / "typo.safetensors"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"sdtune: error: {tmp_path / 'typo.safetensors'}: no such file; check the path"]


def test_embedding_dir_duplicate_and_odd_files_do_not_stop_generation(tmp_path):
    emb_dir = tmp_path / "embeddings"
    (emb_dir / "sub").mkdir(parents=True)
    save_file({"emb_params": torch.randn(1, 64)}, emb_dir / "shiny.safetensors")
    save_file({"emb_params": torch.randn(1, 64)}, emb_dir / "sub" / "shiny.safetensors")  # same name, deeper
    save_file({"emb_params": torch.randn(1, 768)}, emb_dir / "wide.safetensors")
    save_file({"emb_params": torch.randn(1, 64)}, emb_dir / "thing.safetensors")  # a word the tokenizer has
    r = run_cli("generate", "--model", "tiny-random", "--prompt", "shiny, wide, thing", "--steps", "1",
                "--no-progress", "--out", str(tmp_path / "out"), "--embedding-dir", str(emb_dir))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert all(ln.startswith("sdtune: warning: ") for ln in lines), r.stderr
    assert any("same name as" in ln for ln in lines)
    # renaming mends a clash of names only, not another model's embedding
    assert [ln.endswith("use an embedding made for this model (skipped)") for ln in lines if "wide." in ln] == [True]
    assert [ln.endswith("(skipped; in a folder, rename the file to a word of its own)")
            for ln in lines if "thing." in ln] == [True]


def test_a_renamed_a1111_file_says_which_word_other_tools_use(tmp_path):
    """An A1111 .pt loads under the name it stores (diffusers' rule); A1111 and ComfyUI type its file name, so a
    download renamed since (nfixer.pt storing nfixer-271) is said, with the spec that uses the file's word."""
    path = tmp_path / "nfixer.pt"
    torch.save({"string_to_param": {"*": torch.randn(1, 64)}, "name": "nfixer-271"}, path)
    base = load_base("tiny-random")
    with pytest.warns(SdtuneWarning, match=rf"^{path}: loads as 'nfixer-271', the name it stores \(diffusers' "
                                           rf"rule\); A1111 and ComfyUI use its file name 'nfixer': give {path}:nfixer"):
        assert add_embeddings(base, [str(path)]) == ["nfixer-271"]
    assert add_embeddings(base, [f"{path}:nfixer"]) == ["nfixer"]
    # inspect, where users look the trigger word up, says both
    from sdtune.lora import inspect

    info = inspect.describe(path)
    assert (info["token"], info["a1111_word"]) == ("nfixer-271", "nfixer")
    assert "token             nfixer-271 (in sdtune and diffusers; A1111 and ComfyUI: nfixer)" in inspect.render(info)


def test_a_renamed_sdxl_file_sdtune_wrote_says_which_word_other_tools_use(tmp_path):
    """sdtune's SDXL files keep their token in the metadata, which A1111 and ComfyUI ignore: renamed, the file's
    word is said as for an A1111 .pt (it was silently a plain word)."""
    from sdtune.families import TINY_XL
    from sdtune.ti.formats import Embedding, save_embedding

    widths = {te.embedding_key: te.width for te in TINY_XL.text_encoders}
    saved = tmp_path / "zq8.safetensors"
    save_embedding(Embedding("zq8", {k: torch.randn(1, w) for k, w in widths.items()}, "test", "sdxl"), saved)
    renamed = tmp_path / "renamed_style.safetensors"
    saved.rename(renamed)
    base = load_base("tiny-xl")
    with pytest.warns(SdtuneWarning, match=rf"^{renamed}: loads as 'zq8', the name it stores .*A1111 and ComfyUI use "
                                           rf"its file name 'renamed_style'"):
        assert add_embeddings(base, [str(renamed)]) == ["zq8"]


def test_diffusers_sdxl_training_output_loads_as_one_embedding(tmp_path):
    """diffusers' textual_inversion_sdxl.py writes learned_embeds (text_encoder's rows) and learned_embeds_2
    (text_encoder_2's): the folder, or its first file, is one SDXL embedding (refused as an SD 1.x one before)."""
    from sdtune.families import TINY_XL
    from sdtune.ti.formats import load_embedding

    first, second = (torch.randn(2, te.width) for te in TINY_XL.text_encoders)
    out = tmp_path / "textual_inversion_cat"
    out.mkdir()
    save_file({"<cat-toy>": first}, out / "learned_embeds.safetensors")
    save_file({"<cat-toy>": second}, out / "learned_embeds_2.safetensors")
    for given in (out, out / "learned_embeds.safetensors"):
        emb = load_embedding(given)
        assert (emb.token, emb.format) == ("<cat-toy>", "sdxl")
        assert torch.equal(emb.parts["clip_l"], first) and torch.equal(emb.parts["clip_g"], second)
    base = load_base("tiny-xl")
    assert add_embeddings(base, [str(out)], skip_unusable=False) == ["<cat-toy>"]
    ids = base.embeddings.ids("<cat-toy>")
    assert torch.equal(base.text_encoder.get_input_embeddings().weight[ids], first)
    assert torch.equal(base.text_encoder_2.get_input_embeddings().weight[ids], second)


def test_an_embedding_dir_file_changed_or_deleted_is_reloaded_or_unloaded(tmp_path):
    """A long-lived model (the UI) uses the folder's file as it is now, as A1111 rescans: edited, its new rows;
    deleted, none."""
    from sdtune import api

    folder = tmp_path / "embeddings"
    folder.mkdir()
    base = load_base("tiny-random")
    first, second = torch.randn(1, 64), torch.randn(2, 64)

    def rows():
        return base.text_encoder.get_input_embeddings().weight[base.embeddings.ids("zqxemb")].detach()

    save_file({"emb_params": first}, folder / "zqxemb.safetensors")
    api.generate(base, "a zqxemb star", embedding_dirs=[folder], steps=1, progress=False)
    assert torch.equal(rows(), first)
    save_file({"emb_params": second}, folder / "zqxemb.safetensors")
    (res,) = api.generate(base, "a zqxemb star", embedding_dirs=[folder], steps=1, progress=False)
    assert torch.equal(rows(), second) and base.embeddings.expand("zqxemb") == "zqxemb zqxemb_1"
    (folder / "zqxemb.safetensors").unlink()
    api.generate(base, "a zqxemb star", embedding_dirs=[folder], steps=1, progress=False)
    assert "zqxemb" not in base.embeddings


def test_an_embedding_is_a_word_of_its_own_as_in_a1111(tmp_path):
    """A1111 matches an embedding's name as whole tokens: "filenames" does not use "filename" (diffusers' added
    tokens would); the PNG credits only embeddings the prompt uses."""
    from sdtune import api
    from sdtune.generate import parse_infotext

    base = load_base("tiny-random")
    save_file({"emb_params": torch.randn(1, 64)}, tmp_path / "filename.safetensors")
    add_embeddings(base, [str(tmp_path / "filename.safetensors")])
    ids = base.embeddings.ids("filename")
    assert not set(ids) & set(base.tokenizer("many filenames").input_ids)
    assert set(ids) <= set(base.tokenizer("a Filename, and more").input_ids)
    (res,) = api.generate(base, "many filenames", steps=1, progress=False)
    assert "TI hashes" not in parse_infotext(res.infotext)
