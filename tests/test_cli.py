"""The command line through its real entry point (``sdtune.cli.main`` or ``python -m sdtune.cli``): every
subcommand and every flag the README shows, with what each writes and prints; errors are one line."""

import hashlib
import importlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sdtune import __version__, cli, console
from sdtune.cli import main
from sdtune.generate import parse_infotext, read_infotext
from sdtune.lora import blocks
from sdtune.lora.formats import load_lora
from sdtune.lora.inspect import describe
from sdtune.models import load_base
from sdtune.safeio import SdtuneError
from sdtune.ti.formats import Embedding, load_embedding, save_embedding
from sdtune.tiny import world
from sdtune.train.config import read_settings
from sdtune.train.ti import word_hint

generate_module = importlib.import_module("sdtune.generate")  # (sdtune.generate is the API's function)
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
FAST = ["--model", "tiny-random", "--steps", "2", "--no-progress"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sdtune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def tiny_lora(path: Path, scale: float = 0.5, seed: int = 0) -> Path:
    """A kohya LoRA on every attention projection of the tiny model's UNet (rank 2)."""
    g = torch.Generator().manual_seed(seed)
    unet = load_base("tiny-random").unet
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ("attn1" in name or "attn2" in name):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(2, module.in_features, generator=g) * scale
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=g) * scale
            state[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(state, path)
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return tiny_lora(d / "style.safetensors"), tiny_lora(d / "other.safetensors", seed=1)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_version_is_one_line_naming_the_libraries():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.count("\n") == 1  # unwrapped, whatever the terminal's width
    assert r.stdout.startswith(f"sdtune {__version__} (torch {torch.__version__}, ")
    assert f"diffusers {diffusers.__version__}, transformers {transformers.__version__}" in r.stdout


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("args, words", [
    (["--model", "/nonexistent/model.safetensors"], "/nonexistent/model.safetensors"),
    (["--model", "tiny-random", "--scheduler", "bogus"], "unknown scheduler 'bogus'"),
    (["--model", "tiny-random", "--width", "63"], "multiple of 8"),
    (["--model", "tiny-random", "--device", "cuda"], "use --device cpu"),
    (["--model", "tiny-random", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--model", "tiny-random", "--lora", "style.safetensors:heavy"], "must be a finite number"),
])
def test_generate_errors_are_one_line(tmp_path, args, words):
    r = run_cli("generate", "--prompt", "x", "--steps", "1", "--out", tmp_path, *args)
    assert r.returncode == 2
    # nothing else on stderr: no library notices, no traceback
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith("sdtune: error:") and words in r.stderr
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "x", *FAST],
    ["grid", "--prompt", "x", "--x", "seed=1-2", *FAST],
    ["train", "lora", "--data", ".", "--model", "tiny-random", "--preset", "tiny-quick"],
    ["demo", "--quick", "--model", "tiny-random"],
])
@pytest.mark.parametrize("where", ["the folder", "a parent"])
def test_out_where_a_file_stands_is_one_line_and_touches_nothing(tmp_path, capsys, command, where):
    (tmp_path / "data").mkdir()
    blocker = tmp_path / "taken.png"
    blocker.write_bytes(b"keep me")
    out = blocker if where == "the folder" else blocker / "sub"
    assert main([a if a != "." else str(tmp_path / "data") for a in command] + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "is a file, not a folder; choose another place for --out" in err
    assert err.startswith(f"sdtune: error: {out}:") and ("taken.png is" in err if out != blocker else True)
    assert blocker.read_bytes() == b"keep me" and sorted(tmp_path.iterdir()) == [tmp_path / "data", blocker]


def test_file_outputs_refuse_a_folder(tmp_path, loras, capsys):
    (tmp_path / "d").mkdir()
    for command in (["convert", "--to", "diffusers", loras[0]], ["lora", "merge", f"{loras[0]}:1", "--out"]):
        assert main([*map(str, command), str(tmp_path / "d")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [err] and "is a folder; give a file name" in err
    assert not any((tmp_path / "d").iterdir())


def test_corrupt_weights_are_one_line(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    r = run_cli("generate", "--prompt", "x", "--model", bad, "--out", tmp_path)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "broken.safetensors" in r.stderr


def test_a_place_that_cannot_be_written_is_one_line(loras, capsys):
    """A file system refusal (no such folder under /proc, a read-only folder, a full disk) names the place and the
    system's reason in one line, not a traceback; an atomic write's temporary file is named by its folder."""
    assert main(["convert", str(loras[0]), "/proc/sdtune-test/x.safetensors", "--to", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"sdtune: error: /proc/sdtune-test\S*: [^\n]+; check that the folder exists and is "
                        r"writable, or choose another place\n", err), err
    # TensorBoard's writer raises with the path as bytes
    bytes_named = cli._os_error(OSError(13, "Permission denied", b"/proc/run/logs/events.out"))
    assert bytes_named.startswith("/proc/run/logs/events.out: Permission denied; check that the folder")


def test_file_tools_refuse_to_write_over_their_input(tmp_path, loras, capsys):
    """convert, lora merge and lora resize given their input as the output: refused before anything is written
    (the atomic rename would replace the input, read-only or not), as sdtune merge refuses its checkpoint."""
    keep = tmp_path / "keep.safetensors"
    keep.write_bytes(loras[0].read_bytes())
    for args in (["convert", keep, keep, "--to", "diffusers"], ["lora", "resize", keep, "--rank", "1", "--out", keep],
                 ["lora", "merge", f"{loras[1]}:0.5", f"{keep}:1", "--out", keep]):
        assert main([str(a) for a in args]) == 2
        assert capsys.readouterr().err == f"sdtune: error: {keep}: is an input of this command; write to a new file\n"
    assert keep.read_bytes() == loras[0].read_bytes()


def test_inspect_of_a_folder_says_so(tmp_path, loras, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lora.safetensors").write_bytes(loras[0].read_bytes())
    assert main(["inspect", str(tmp_path / "run")]) == 2  # it said "no such file"
    assert capsys.readouterr().err == (f"sdtune: error: {tmp_path / 'run'}: is a folder; give a LoRA, embedding or "
                                       f"checkpoint file (it holds lora.safetensors), or several (sdtune inspect "
                                       f"{tmp_path / 'run' / '*.safetensors'})\n")
    # a diffusers or PEFT adapter folder is one LoRA, as convert and --lora read it: described as its file
    (tmp_path / "run" / "lora.safetensors").rename(tmp_path / "run" / "adapter_model.safetensors")
    assert main(["inspect", str(tmp_path / "run"), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described == describe(tmp_path / "run" / "adapter_model.safetensors") and described["modules"]


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (--out's default, out/, is made here, not in the folder pytest runs in)
    r = run_cli("--debug", "generate", "--prompt", "x", "--model", tmp_path / "missing.safetensors")
    assert r.returncode != 0 and "Traceback" in r.stderr and "SdtuneError" in r.stderr


# ---------------------------------------------------------------- generate

def test_generate_writes_pngs_with_metadata(tmp_path, capsys):
    assert main(["generate", "--prompt", "a red circle", "--seed", "3", "--num-images", "2", "--out", str(tmp_path),
                 "--device", "cpu", "--dtype", "fp32", *FAST]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 3 and all(p.endswith(".png") for p in printed)
    info = parse_infotext(read_infotext(tmp_path / "00001-4.png"))
    assert info["prompt"] == "a red circle" and info["Seed"] == "4" and info["Steps"] == "2"


def _interrupt_at_sampler_step(monkeypatch, n: int) -> None:
    """A Ctrl-C (KeyboardInterrupt) in the ``n``-th sampler step of the command, counted over all its pipelines."""
    real, calls = generate_module.make_scheduler, [0]

    def counted(name, base_scheduler):
        scheduler = real(name, base_scheduler)
        step = scheduler.step

        def interrupted_step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                raise KeyboardInterrupt
            return step(*args, **kwargs)
        scheduler.step = interrupted_step
        return scheduler
    monkeypatch.setattr(generate_module, "make_scheduler", counted)


def test_a_ctrl_c_keeps_the_images_already_drawn(tmp_path, capsys, monkeypatch):
    """generate writes each batch (4 images) when it is done: a Ctrl-C in the second batch keeps the first four, and
    they are the pixels an uninterrupted run draws. A grid keeps the cells drawn, in a grid with a gap."""
    run = ["generate", "--prompt", "a red circle", "--seed", "3", "--num-images", "5", *FAST]
    assert main([*run, "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    _interrupt_at_sampler_step(monkeypatch, 3)  # 2 steps a batch: the 1st step of the second batch
    assert main([*run, "--out", str(tmp_path / "cut")]) == 130
    out, err = capsys.readouterr()
    kept = [f"0000{i}-{3 + i}.png" for i in range(4)]
    assert [Path(p).name for p in out.split()] == kept and err.strip() == "sdtune: interrupted"
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == kept  # no grid, no temporary
    for name in kept:
        assert np.array_equal(pixels(tmp_path / "cut" / name), pixels(tmp_path / "whole" / name))
        assert read_infotext(tmp_path / "cut" / name) == read_infotext(tmp_path / "whole" / name)

    _interrupt_at_sampler_step(monkeypatch, 3)  # the first step of the second cell (each cell its own prompt)
    with pytest.warns(console.SdtuneWarning) as notes:
        assert main(["grid", "--prompt", "a red star", "--x", "sr=red|blue", "--seed", "1", "--out",
                     str(tmp_path / "grid"), *FAST]) == 130
    assert [str(n.message) for n in notes] == [f"stopped after 1 of 2 cells: {tmp_path / 'grid' / 'xy.png'} shows "
                                              f"them, blank where a cell was not drawn"]
    assert capsys.readouterr().err.strip() == "sdtune: interrupted"
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["xy-00-00.png", "xy.json", "xy.png"]
    record = json.loads((tmp_path / "grid" / "xy.json").read_text())
    assert record["cells"] == [["xy-00-00.png", None]] and Image.open(tmp_path / "grid" / "xy.png").width > 128


def test_generate_with_loras_weights_and_tags(tmp_path, loras, capsys):
    style, other = loras
    common = ["--prompt", "a red circle", "--seed", "1", *FAST]
    assert main(["generate", *common, "--out", str(tmp_path / "base")]) == 0
    assert main(["generate", *common, "--out", str(tmp_path / "mixed"), "--lora", f"{style}:0.7",
                 "--lora", f"{other}:-0.3"]) == 0
    assert main(["generate", "--prompt", "a red circle, <lora:style:0.7>", "--seed", "1", *FAST,
                 "--lora-dir", str(style.parent), "--out", str(tmp_path / "tag")]) == 0
    capsys.readouterr()
    base, mixed, tag = (pixels(next((tmp_path / d).glob("*.png"))) for d in ("base", "mixed", "tag"))
    assert np.abs(base - mixed).max() > 0 and np.abs(base - tag).max() > 0 and np.abs(mixed - tag).max() > 0
    mixed_info = parse_infotext(read_infotext(next((tmp_path / "mixed").glob("*.png"))))
    assert mixed_info["Lora weights"] == "style=0.7; other=-0.3"
    tag_info = parse_infotext(read_infotext(next((tmp_path / "tag").glob("*.png"))))
    assert tag_info["prompt"] == "a red circle, <lora:style:0.7>"  # kept, so the PNG reproduces the image
    # one file twice, or two files of one name: the later replaced the first without a word; now one line
    twin = tmp_path / "b" / "style.safetensors"
    twin.parent.mkdir()
    twin.write_bytes(other.read_bytes())
    for second in (f"{style}:0.4", f"{twin}:0.4"):
        assert main(["generate", *common, "--out", str(tmp_path / "twice"), "--lora", f"{style}:0.7",
                     "--lora", second]) == 2
        assert capsys.readouterr().err.strip() == (
            f"sdtune: error: --lora {second}: a LoRA named style is given already (--lora {style}:0.7); give each "
            f"file once, with the weight it should have, and rename one of two files of one name (prompt tags and "
            f"PNGs name a LoRA by its file name)")
    assert not list((tmp_path / "twice").glob("*.png"))


def test_generate_with_an_embedding_in_the_negative_prompt(tmp_path, capsys):
    emb = tmp_path / "EasyNeg.safetensors"
    save_file({"emb_params": torch.randn(2, 64) * 3}, emb)
    common = ["--prompt", "a red circle", "--seed", "1", *FAST]
    assert main(["generate", *common, "--out", str(tmp_path / "plain"), "--negative-prompt", "blurry"]) == 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["generate", *common, "--out", str(tmp_path / "neg"), "--embedding", str(emb),
                     "--negative-prompt", "EasyNeg"]) == 0
    assert not [w for w in seen if issubclass(w.category, console.SdtuneWarning)]  # its word is typed
    assert main(["generate", *common, "--out", str(tmp_path / "dir"), "--embedding-dir", str(tmp_path),
                 "--negative-prompt", "EasyNeg"]) == 0
    # a renamed diffusers file loads as the word it stores: typing its file's name uses nothing, which is said
    renamed = tmp_path / "other" / "EasyNegative.safetensors"
    renamed.parent.mkdir()
    save_file({"<sks>": torch.randn(1, 64)}, renamed)
    with pytest.warns(console.SdtuneWarning) as notes:
        assert main(["generate", *common, "--out", str(tmp_path / "renamed"), "--embedding", str(renamed),
                     "--negative-prompt", "EasyNegative"]) == 0
    assert [str(n.message) for n in notes] == [f"{renamed}: loaded as '<sks>', which no prompt types, so it changes "
                                               f"nothing; type <sks>, or give FILE:WORD to load it as another word"]
    plain, neg, by_dir = (next((tmp_path / d).glob("*.png")) for d in ("plain", "neg", "dir"))
    assert parse_infotext(read_infotext(neg))["negative_prompt"] == "EasyNeg"
    assert np.abs(pixels(plain) - pixels(neg)).max() > 0
    assert np.array_equal(pixels(neg), pixels(by_dir))  # the same embedding, found by its file name


# ---------------------------------------------------------------- inspect, convert, merge

def test_inspect_text_and_json(loras, capsys):
    style, _ = loras
    assert main(["inspect", str(style)]) == 0
    text = capsys.readouterr().out
    assert "format" in text and "kohya" in text
    assert main(["inspect", str(style), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya" and info["ranks"] == [2] and info["alphas"] == [2.0]
    # every layer in one block of the lora-block-weight layout (text-encoder layers in BASE), in its order
    assert sum(info["blocks"].values()) == sum(info["modules"].values())
    assert info["blocks"].get("BASE", 0) == sum(n for c, n in info["modules"].items() if c != "unet")
    assert list(info["blocks"]) == [b for b in (*blocks.TINY.blocks, "none") if b in info["blocks"]]
    assert "layers per block" in text


def test_inspect_of_several_files_says_each_and_goes_past_a_bad_one(tmp_path, loras, capsys):
    style, other = loras
    missing = tmp_path / "missing.safetensors"
    assert main(["inspect", str(style), str(other)]) == 0
    text = capsys.readouterr().out
    assert [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("file ")] == [str(style), str(other)]
    assert "\n\nfile " in text  # a blank line between the two tables
    # JSON: a list in the order given; one that cannot be read is its own line, the others still described, exit 2
    assert main(["inspect", str(style), str(missing), str(other), "--json"]) == 2
    out, err = capsys.readouterr()
    assert [info["file"] for info in json.loads(out)] == [str(style), str(other)]
    assert err == (f"sdtune: error: {missing}: no such file; check the path\n"
                   f"sdtune: error: 1 of 3 files could not be inspected (said above): {missing}\n")
    assert main(["inspect", str(style), "--json"]) == 0  # one file: one object, as before
    assert json.loads(capsys.readouterr().out)["file"] == str(style)


def test_inspect_describes_embeddings_of_every_layout(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    sdxl = Embedding("<x>", {"clip_l": torch.randn(2, 768, generator=g), "clip_g": torch.randn(2, 1280, generator=g)},
                     "made here", "sdxl", training={"step": "500"})
    save_embedding(sdxl, tmp_path / "xl.safetensors")
    save_embedding(Embedding("<p>", torch.randn(3, 1024, generator=g), "made here", "a1111", training={"step": "12"}),
                   tmp_path / "p.pt", format="a1111")
    save_file({"emb_params": torch.randn(1, 768, generator=g).bfloat16()}, str(tmp_path / "kohya-style.safetensors"))
    want = {"xl.safetensors": ("<x>", 2, {"clip_l": 768, "clip_g": 1280}, "SDXL", "sdxl", "float32", 500),
            "p.pt": ("<p>", 3, {"": 1024}, "SD 2.x", "sd2", "float32", 12),
            "kohya-style.safetensors": ("kohya-style", 1, {"": 768}, "SD 1.x", "sd1", "bfloat16", None)}  # as stored
    for name, (token, n, widths, title, family, dtype, step) in want.items():
        assert main(["inspect", str(tmp_path / name), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["kind"], info["token"], info["vectors"], info["widths"], info["family_name"], info["family"],
                info["dtypes"], info["training"].get("step")) == ("embedding", token, n, widths, title, family,
                                                                  [dtype], step), name
        assert info["hashes"]["autov2"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()[:10]
    assert main(["inspect", str(tmp_path / "xl.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "Textual Inversion embedding" in text and "clip_l 768, clip_g 1280" in text and "SDXL" in text


REAL_FILES = sorted(p for sub in ("lora", "ti") for p in (FIXTURES / sub).glob("*")
                    if p.suffix in (".safetensors", ".pt", ".bin", ".pti")) if FIXTURES.is_dir() else []


@pytest.mark.skipif(not REAL_FILES, reason=f"real adapter fixtures not found at {FIXTURES}")
@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_inspect_json_answers_every_real_file(path, capsys):
    code = main(["inspect", str(path), "--json"])
    out, err = capsys.readouterr()
    if code == 0:
        assert json.loads(out)["file"] == str(path) and err == ""
        # every embedding layout is described as one (SD 1.x, SD 2.x and SDXL files among them)
        assert (json.loads(out).get("kind") == "embedding") == (path.parent.name == "ti")
    else:  # a file sdtune will not read (an unsafe pickle) is refused in one line
        assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith(f"sdtune: error: {path}")
        assert "pickle" in err


@pytest.mark.parametrize("to", ["diffusers", "kohya"])
def test_convert(tmp_path, loras, to, capsys):
    style, _ = loras
    out = tmp_path / f"{to}.safetensors"
    assert main(["convert", str(style), str(out), "--to", to]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: ")
    before, after = load_lora(style), load_lora(out)
    assert after.format == to and len(after) == len(before)
    for comp, path, ad in before.items():
        shape = (ad.tensors["up"].shape[0], ad.tensors["down"].shape[1])
        assert torch.equal(after.modules[comp][path].delta(shape), ad.delta(shape))  # lossless: same tensors


def test_convert_to_kohya_says_when_diffusers_will_not_load_the_result(tmp_path, capsys):
    """diffusers' load_lora_weights refuses two kohya files A1111 reads: bundled words, and text-encoder layers
    without an out_proj; convert says so and names the layout it loads (the output is written all the same)."""
    g = torch.Generator().manual_seed(0)
    q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    te_only = {f"{q}.lora_down.weight": torch.randn(2, 64, generator=g), f"{q}.lora_up.weight": torch.zeros(64, 2)}
    save_file(te_only, tmp_path / "te.safetensors")
    save_file({**te_only, "bundle_emb.<w>.string_to_param.*": torch.randn(1, 64, generator=g)},
              tmp_path / "words.safetensors")
    save_file({**te_only, q.replace("q_proj", "out_proj") + ".lora_down.weight": torch.randn(2, 64, generator=g),
               q.replace("q_proj", "out_proj") + ".lora_up.weight": torch.zeros(64, 2)}, tmp_path / "fine.safetensors")
    for name, why in (("te", "text-encoder layers without an out_proj (its kohya reader infers the layout from one)"),
                      ("words", "its bundled words (keys without 'lora')"), ("fine", None)):
        out = tmp_path / f"{name}-k.safetensors"
        assert main(["convert", str(tmp_path / f"{name}.safetensors"), str(out), "--to", "kohya"]) == 0
        said = capsys.readouterr().out.strip()
        assert said.endswith(f"; A1111 and ComfyUI read it, diffusers' load_lora_weights does not ({why}): --to "
                             f"diffusers writes one it loads") if why else said.endswith("modules in kohya layout")
        assert out.is_file()


def test_merge_into_a_single_file(tmp_path, loras, capsys):
    style, _ = loras
    model = tmp_path / "base.safetensors"
    assert main(["merge", "--model", "tiny-random", "--lora", f"{style}:0.0", "--out", str(model)]) == 0
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--model", str(model), "--lora", f"{style}:0.8", "--out", str(out),
                 "--save-dtype", "fp32"]) == 0
    assert capsys.readouterr().out.strip().endswith("merged.safetensors")
    expected = load_base(str(model))
    expected.loras.add("style", style, 0.8)
    merged = load_base(str(out))
    for (name, want), (_, got) in zip(expected.unet.state_dict().items(), merged.unet.state_dict().items()):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), name
    # its images name it as A1111 names a checkpoint (the file name without suffix), never by the local path
    assert main(["generate", "--model", str(out), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "g")]) == 0
    png = Path(capsys.readouterr().out.split()[0])
    assert parse_infotext(read_infotext(png))["Model"] == "merged"


def test_merge_into_a_folder_has_the_usual_permissions_and_a_ckpt_name_is_refused(tmp_path, loras, capsys):
    style, _ = loras
    folder = tmp_path / "merged"
    assert main(["merge", "--model", "tiny-random", "--lora", f"{style}:0.5:te=0.2", "--out", str(folder)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700: other accounts can read it
    assert (folder / "model_index.json").is_file()
    capsys.readouterr()
    # an A1111 user's model.ckpt would otherwise be a diffusers folder of that name
    assert main(["merge", "--model", "tiny-random", "--lora", str(style), "--out", str(tmp_path / "m.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"use {tmp_path / 'm.safetensors'} or a folder name" in err
    assert not (tmp_path / "m.ckpt").exists()
    half = tmp_path / "half"  # --save-dtype halves a folder too
    assert main(["merge", "--model", str(folder), "--lora", f"{style}:0", "--out", str(half), "--save-dtype", "fp16"]) == 0
    assert {v.dtype for v in load_file(half / "unet" / "diffusion_pytorch_model.safetensors").values()} == {
        torch.float16}
    assert (half / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < (
        folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size * 0.51


# ---------------------------------------------------------------- train

@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    return world.write_dataset(tmp_path_factory.mktemp("data"), world.concept_scenes(4, seed=3, shape="star"))


def test_train_ti(tmp_path, shapes_data, capsys):
    out = tmp_path / "ti"
    assert main(["train", "ti", "--data", str(shapes_data), "--token", "<my-thing>", "--init-token", "star",
                 "--out", str(out), "--model", "tiny-random", "--steps", "2", "--batch-size", "2",
                 "--no-progress"]) == 0
    said = capsys.readouterr()
    printed = Path(said.out.strip().splitlines()[-1])
    emb = load_embedding(printed)
    assert printed.parent == out and emb.token == "<my-thing>" and emb.vectors.shape == (1, 64)
    # which word to type where: A1111 and ComfyUI name an embedding by its file, not by the token inside
    assert said.err.strip().splitlines()[-1] == (
        f"sdtune train ti: type <my-thing> in sdtune (--embedding {printed}) and diffusers; A1111 and ComfyUI take "
        f"the file's name as the word: put a copy of learned_embeds.safetensors named my-thing.safetensors in their "
        f"embeddings folder and type my-thing (ComfyUI: embedding:my-thing)")
    assert f"put {out / 'my-thing.pt'}, written beside, in their" in word_hint("<my-thing>", out, with_pt=True)
    # the file says how it was trained, and its settings rerun the run as its settings.toml does
    assert main(["inspect", str(printed)]) == 0
    shown = capsys.readouterr().out
    assert re.search(r"^trained +2 steps on tiny-random \(model hash [0-9a-f]{10}\)$", shown, re.M)
    assert f"sdtune train ti --config {printed} reruns them" in shown
    assert read_settings(printed, kind="ti") == read_settings(out / "settings.toml", kind="ti")
    with pytest.raises(SdtuneError, match=r"holds \[ti\] settings, not \[lora\]; use sdtune train ti"):
        read_settings(printed, kind="lora")
    # a copy keeps them; an embedding made elsewhere has none, so nothing to rerun
    save_embedding(emb, tmp_path / "copy.safetensors")
    assert load_embedding(tmp_path / "copy.safetensors").training == emb.training
    save_embedding(Embedding(emb.token, emb.vectors, "made here", "diffusers"), tmp_path / "bare.safetensors")
    with pytest.raises(SdtuneError, match=r"bare.safetensors: holds no training settings .* give a TOML file"):
        read_settings(tmp_path / "bare.safetensors", kind="ti")


def test_progress_in_a_log_file_is_plain_lines(monkeypatch):
    """With stderr not a terminal (a batch job, CI, ``2> log``) progress is a plain line every LOG_SECONDS and
    one at the end, never a bar redrawn with carriage returns (a training run's: test_train_presets); on a
    terminal the bar is tqdm's."""
    monkeypatch.setattr(console, "LOG_SECONDS", 0.0)  # every update
    monkeypatch.setattr(sys, "stderr", type("Log", (io.StringIO,), {"isatty": lambda self: False})())
    with console.progress(4, "grid", "img", initial=1) as bar:
        bar.update(2)
        bar.set_postfix(loss="0.5")
        bar.update(1)
    lines = sys.stderr.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["grid: 3/4 img", "grid: 4/4 img"]
    assert lines[-1].endswith("img/s, loss=0.5")
    with console.progress(4, "idle", "img"):
        pass
    assert sys.stderr.getvalue().splitlines() == lines  # nothing done: nothing said
    monkeypatch.setattr(sys, "stderr", type("Tty", (io.StringIO,), {"isatty": lambda self: True})())
    assert isinstance(console.progress(4, "grid", "img"), tqdm)


def test_train_lora(tmp_path, shapes_data, capsys):
    out = tmp_path / "lora"
    assert main(["train", "lora", "--data", str(shapes_data), "--rank", "16", "--alpha", "8", "--out", str(out),
                 "--model", "tiny-random", "--steps", "2", "--batch-size", "2", "--no-progress"]) == 0
    printed = Path(capsys.readouterr().out.strip().splitlines()[-1])
    lora = load_lora(printed)
    assert printed.parent == out and lora.format == "kohya" and len(lora) > 0
    assert read_settings(printed, kind="lora") == read_settings(out / "settings.toml", kind="lora")  # --config FILE
    assert {ad.rank for _, _, ad in lora.items()} == {16} and {ad.alpha for _, _, ad in lora.items()} == {8.0}
    # every output has the usual permissions (the umask's), not the 0600 of its temporary file: A1111 or
    # ComfyUI under another account can read it
    umask = os.umask(0)
    os.umask(umask)
    for f in (printed, out / "loss.csv", out / "resume.pt", out / "settings.toml"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_train_with_a_vae_given_apart(tmp_path, shapes_data, capsys):
    """--vae trains on the latents of that VAE, records it as kohya does (ss_vae_name, ss_new_vae_hash) and in
    settings.toml, is refused as a change on resume, and leaves the model's own VAE in place afterwards."""
    from sdtune.lora.hashes import file_sha256
    from sdtune.models import load_base, vae_swapped

    base = load_base("tiny-random")
    own = {k: v.clone() for k, v in base.vae.state_dict().items()}
    brighter = tmp_path / "brighter.safetensors"
    save_file({k: (v * 1.02).contiguous() for k, v in own.items()}, str(brighter))
    run = ["train", "lora", "--data", str(shapes_data), "--model", "tiny-random", "--steps", "2", "--batch-size", "2",
           "--sample-every", "0", "--no-progress", "--no-report"]
    assert main([*run, "--out", str(tmp_path / "plain")]) == 0
    assert main([*run, "--out", str(tmp_path / "vae"), "--vae", str(brighter)]) == 0
    plain, other = (load_lora(tmp_path / name / "lora.safetensors") for name in ("plain", "vae"))
    assert other.metadata["ss_vae_name"] == "brighter.safetensors"
    assert other.metadata["ss_new_vae_hash"] == file_sha256(brighter) and "ss_vae_name" not in plain.metadata
    assert any(not torch.equal(ad.tensors["up"], other.modules[c][p].tensors["up"]) for c, p, ad in plain.items())
    assert read_settings(tmp_path / "vae" / "settings.toml", kind="lora")["vae"] == str(brighter)
    capsys.readouterr()
    assert main([*run, "--out", str(tmp_path / "vae"), "--steps", "3"]) == 2  # resumed without it: refused
    assert "other settings (vae" in capsys.readouterr().err
    assert main([*run, "--out", str(tmp_path / "x"), "--vae", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors: no such VAE file or folder; check --vae" in capsys.readouterr().err
    with vae_swapped(base, brighter):
        assert base.vae_file == brighter
    assert base.vae_file is None and all(torch.equal(v, own[k]) for k, v in base.vae.state_dict().items())


def test_a_bad_value_from_a_config_file_is_named_by_its_key(tmp_path, shapes_data, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'[lora]\ndata = "{shapes_data}"\nsave_every = -5\n')
    run = ["train", "lora", "--config", str(config), "--out", str(tmp_path / "o"), "--model", "tiny-random"]
    assert main(run) == 2
    assert capsys.readouterr().err.strip() == f"sdtune: error: save_every (in {config}) -5: must be 0 or more"
    assert main([*run, "--save-every", "-3"]) == 2  # given as a flag: named as the flag
    assert capsys.readouterr().err.strip() == "sdtune: error: --save-every -3: must be 0 or more"


# ---------------------------------------------------------------- grid, eval-tiny

def test_grid_weights_and_axes(tmp_path, loras, capsys):
    style, other = loras
    assert main(["grid", "--prompt", "a red star", "--lora", str(style), "--weights", "0,0.5,1",
                 "--out", str(tmp_path / "w"), "--seed", "1", *FAST]) == 0
    w_grid = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert w_grid.is_file() and len(list((tmp_path / "w").glob("*-00-0[0-2].png"))) == 3
    assert main(["grid", "--prompt", "a red star", "--lora", str(style), "--lora", str(other),
                 "--x", "loras=none|style|style:0.5+other:1", "--y", "seed=1-3", "--out", str(tmp_path / "xy"),
                 *FAST]) == 0
    xy_grid = Path(capsys.readouterr().out.strip().splitlines()[-1])
    cells = sorted((tmp_path / "xy").glob("*-0[0-9]-0[0-9].png"))
    assert xy_grid.is_file() and len(cells) == 9  # 3 seeds x 3 adapter mixes
    first_row = [pixels(c) for c in cells[:3]]
    assert np.abs(first_row[0] - first_row[1]).max() > 0 and np.abs(first_row[1] - first_row[2]).max() > 0
    # a second grid into the same --out keeps the first (numbered, as generate's images are)
    before = {p: p.read_bytes() for p in (tmp_path / "xy").iterdir()}
    assert main(["grid", "--prompt", "a red star", "--x", "seed=5,6", "--out", str(tmp_path / "xy"), *FAST]) == 0
    again = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert again == tmp_path / "xy" / "xy-2.png" and {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in (tmp_path / "xy").glob("xy-2*")) == [
        "xy-2-00-00.png", "xy-2-00-01.png", "xy-2.json", "xy-2.png"]
    # both axes of one kind: one would hide the other
    assert main(["grid", "--prompt", "x", "--x", "seed=1,2", "--y", "seed=3,4", "--out", str(tmp_path / "s"),
                 *FAST]) == 2
    assert "--x and --y both set seed: the grid would show one of them" in capsys.readouterr().err


def test_eval_tiny_prints_the_table(capsys):
    assert main(["eval-tiny", "--model", "tiny-random", "--images", "1", "--steps", "1"]) == 0
    table = capsys.readouterr().out
    assert "red circle" in table and "heart" in table and "%" in table
    # the style row shows its style score; the pairs the base composes are not called failures to come
    header, _, *rows = table.splitlines()
    assert header.split() == ["prompt", "images", "shape", "colour", "style", "all"]
    assert len(next(r for r in rows if r.startswith("outline style")).split("%")) == 5  # 4 scores
    assert "unseen pairs it composes from the words" in table
    # a gate for scripts: the random model draws few held-in prompts right (by chance)
    assert main(["eval-tiny", "--model", "tiny-random", "--images", "1", "--steps", "1", "--min-held-in", "80"]) == 2
    out, err = capsys.readouterr()
    shown = re.search(r"held-in overall +8 +(\d+)%", out).group(1)
    assert err == f"sdtune: error: held-in overall {shown}% is below --min-held-in 80%\n"
    assert main(["eval-tiny", "--model", "tiny-random", "--images", "1", "--steps", "1", "--min-held-in", "0"]) == 0
    capsys.readouterr()
    # another architecture: measured, but said to be outside what the judge knows
    with pytest.warns(console.SdtuneWarning, match=r"^sdxl-small-random is an sdxl model, not one trained on the "
                                                   r"shapes world: the judge knows only that world's flat shapes"):
        assert main(["eval-tiny", "--model", "sdxl-small-random", "--images", "1", "--steps", "1"]) == 0
    assert "red circle" in capsys.readouterr().out


def test_importing_sdtune_freezes_the_import_and_leaves_the_collector_as_it_was():
    """The import's ~700k objects are frozen (no later collection walks them), the collector stays on, and what
    a program creates afterwards is still collected (see console.imports_without_gc)."""
    probe = ("import gc, sys, weakref\n"
             "enabled = gc.isenabled()\n"
             "import sdtune.cli\n"
             "from sdtune import load_base\n"  # the API: diffusers and transformers, imported on first use
             "class Node: pass\n"
             "a, b = Node(), Node(); a.other, b.other = b, a; ref = weakref.ref(a); del a, b\n"
             "gc.collect()\n"
             "print(enabled, gc.isenabled(), gc.get_freeze_count() > 100_000, ref() is None)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["True", "True", "True", "True"], out.stderr[-2000:]


def test_inspect_and_convert_run_without_diffusers_or_transformers(tmp_path):
    """The file tools read module names from the families' shipped tables, so they import neither library (their
    imports were ~3 of inspect's 4.4 seconds); what they say and write is the same."""
    lora = tmp_path / "k.safetensors"
    unet = "lora_unet_down_blocks_0_attentions_0_proj_in"  # SD 1.x's is a 1x1 convolution: the table says so
    save_file({f"{unet}.lora_down.weight": torch.ones(4, 320), f"{unet}.lora_up.weight": torch.ones(320, 4),
               f"{unet}.alpha": torch.tensor(2.0),
               "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(4, 768),
               "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(1280, 4),
               "lora_te_text_model_encoder_layers_11_mlp_fc1.lora_down.weight": torch.ones(4, 768),
               "lora_te_text_model_encoder_layers_11_mlp_fc1.lora_up.weight": torch.ones(3072, 4)}, lora)
    probe = ("import json, sys\n"
             "from sdtune import cli\n"
             f"assert cli.main(['inspect', {str(lora)!r}, '--json']) == 0\n"
             f"assert cli.main(['convert', {str(lora)!r}, {str(tmp_path / 'd.safetensors')!r}, '--to', 'diffusers']) == 0\n"
             "heavy = ('diffusers', 'transformers', 'accelerate', 'peft', 'gradio', 'huggingface_hub')\n"
             "print('IMPORTED', *[m for m in heavy if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    info, _ = json.JSONDecoder().raw_decode(out.stdout)
    assert (info["family"], info["fits"], info["conv1x1_layers"]) == ("sd1", {"unet": 2, "text_encoder": 1}, 1)
    assert out.stdout.splitlines()[-1] == "IMPORTED"
    assert sorted(load_file(tmp_path / "d.safetensors")) == [
        "text_encoder.text_model.encoder.layers.11.mlp.fc1.lora_A.weight",
        "text_encoder.text_model.encoder.layers.11.mlp.fc1.lora_B.weight",
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"]


def test_the_command_line_parses_without_diffusers_and_the_api_loads_on_first_use():
    """`sdtune --help`, --version and a refused flag answer before diffusers and transformers are imported (they
    were most of the 4 to 5 seconds such an answer took); the API's names import them when first used, and
    `sdtune.generate` stays the API's function though a submodule has the same name."""
    probe = ("import sys\n"
             "from sdtune import cli\n"
             "cli.build_parser().parse_args(['train', 'lora', '--rank', '4', '--algo', 'loha'])\n"
             "heavy = ('diffusers', 'transformers', 'accelerate', 'peft', 'gradio', 'huggingface_hub')\n"
             "print(*[m for m in heavy if m in sys.modules], 'parsed')\n"
             "import sdtune.generate\n"
             "from sdtune import generate, load_base\n"
             "import sdtune\n"
             "print(generate.__module__, load_base.__module__, sdtune.generate is generate, 'diffusers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["parsed", "sdtune.api", "sdtune.models", "True", "True"], out.stderr[-2000:]
    r = run_cli("--help")
    assert r.returncode == 0 and r.stderr == "" and "train" in r.stdout and "inspect" in r.stdout
    r = run_cli("train", "lora", "--rnak", "4")
    # said by the command's own parser (the top one's named sdtune's commands instead), in one line
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "sdtune train lora: error: unrecognized arguments: --rnak 4 (--rnak: did you mean --rank?); see sdtune train "
        "lora --help"]


@pytest.mark.parametrize(("args", "said"), [
    (["generate", "--promt", "x"], "sdtune generate: error: the following arguments are required: --prompt (--promt: "
                                   "did you mean --prompt?); see sdtune generate --help"),
    (["generate", "--prompt", "x", "--rank", "4"], "sdtune generate: error: unrecognized arguments: --rank 4 (--rank "
     "is an option of sdtune lora merge, sdtune lora resize, sdtune lora extract, sdtune train lora); see sdtune "
     "generate --help"),
    (["train", "lora", "--network_dim=4", "--learning_rate", "1e-3"], "sdtune train lora: error: unrecognized "
     "arguments: --network_dim=4 --learning_rate 1e-3 (--network_dim: kohya's/diffusers' name, sdtune's is --rank; "
     "--learning_rate: kohya's/diffusers' name, sdtune's is --lr); see sdtune train lora --help"),
    (["generate", "--prompt", "x", "--negative_prompt", "y"], "sdtune generate: error: unrecognized arguments: "
     "--negative_prompt y (--negative_prompt: sdtune writes it --negative-prompt); see sdtune generate --help"),
    (["inspect", "f", "--zz"], "sdtune inspect: error: unrecognized arguments: --zz (--zz: no command takes it); see "
                               "sdtune inspect --help"),
    (["genrate", "--prompt", "x"], "sdtune: error: argument command: invalid choice: 'genrate' (choose from "
     "'generate', 'inspect', 'convert', 'lora', 'merge', 'train', 'grid', 'demo', 'eval-tiny', 'ui'); see sdtune "
     "--help"),
])
def test_a_mistyped_or_misplaced_option_is_one_line_naming_the_likely_one(args, said, capsys):
    """The README's promise (one line that says what is wrong and the fix) holds for argparse's refusals too: no
    usage block, and a misspelt flag, kohya's name for one, or another command's flag is named as such."""
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and capsys.readouterr().err == said + "\n"
