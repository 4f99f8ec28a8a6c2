"""Embedding files: every layout reads into the same Embedding, bad files fail with one clear line."""

from __future__ import annotations

import collections
import os
import pickle
import re
import warnings
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtune.console import SdtuneWarning
from sdtune.safeio import SdtuneError
from sdtune.ti.formats import Embedding, load_embedding, save_embedding

D = 64


def rows(n=1, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_diffusers_safetensors_1d_and_2d(tmp_path):
    one, multi = rows(1, 1)[0], rows(3, 2)
    save_file({"<one>": one}, tmp_path / "one.safetensors")
    save_file({"<multi>": multi}, tmp_path / "learned_embeds.safetensors")
    emb = load_embedding(tmp_path / "one.safetensors")
    assert (emb.token, emb.format, emb.vectors.shape, emb.vectors.dtype) == ("<one>", "diffusers", (1, D), torch.float32)
    assert torch.equal(emb.vectors[0], one)
    emb = load_embedding(tmp_path)  # a folder resolves to its learned_embeds file
    assert (emb.token, emb.num_vectors, emb.width) == ("<multi>", 3, D)
    assert torch.equal(emb.vectors, multi)


def test_diffusers_bin_and_half_precision(tmp_path):
    vec = rows(2, 3).to(torch.bfloat16)
    torch.save({"<b>": vec}, tmp_path / "learned_embeds.bin")
    emb = load_embedding(tmp_path / "learned_embeds.bin")
    assert emb.token == "<b>" and emb.format == "diffusers" and emb.vectors.dtype == torch.float32
    assert torch.equal(emb.vectors, vec.float())


def test_a1111_pt_with_parameter_and_name(tmp_path):
    vec = torch.nn.Parameter(rows(2, 4))  # A1111 saves the trained Parameter itself
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "my-style", "step": 1200,
                "sd_checkpoint": "abc", "sd_checkpoint_name": "model"}, tmp_path / "whatever.pt")
    emb = load_embedding(tmp_path / "whatever.pt")
    assert (emb.token, emb.format) == ("my-style", "a1111")
    assert torch.equal(emb.vectors, vec.detach()) and not emb.vectors.requires_grad
    assert load_embedding(tmp_path / "whatever.pt", token="renamed").token == "renamed"


def test_kohya_emb_params_takes_file_name(tmp_path):
    vec = rows(4, 5)
    save_file({"emb_params": vec}, tmp_path / "neg-embed.safetensors")
    emb = load_embedding(tmp_path / "neg-embed.safetensors")
    assert (emb.token, emb.format) == ("neg-embed", "kohya") and torch.equal(emb.vectors, vec)


def test_bare_tensor_needs_a_token(tmp_path):
    vec = rows(1, 6)[0]
    torch.save(vec, tmp_path / "bare.pt")
    emb = load_embedding(tmp_path / "bare.pt", token="<bare>")
    assert (emb.token, emb.format) == ("<bare>", "tensor") and torch.equal(emb.vectors[0], vec)
    with pytest.raises(SdtuneError, match=r"bare tensor.*bare\.pt:TOKEN"):
        load_embedding(tmp_path / "bare.pt")


def xl_parts(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"clip_l": torch.randn(n, 768, generator=gen), "clip_g": torch.randn(n, 1280, generator=gen)}


@pytest.mark.parametrize("fmt, keys", [("sdxl", ("clip_l", "clip_g")), ("pti", ("text_encoders_0", "text_encoders_1")),
                                       ("emb2", ("emb", "emb2"))])
def test_sdxl_layouts_read_into_clip_l_and_clip_g(tmp_path, fmt, keys):
    parts = xl_parts(2, 1)
    raw = {keys[0]: parts["clip_l"].to(torch.bfloat16), keys[1]: parts["clip_g"].to(torch.bfloat16)}
    save_file(raw, tmp_path / "xl-thing.safetensors")
    torch.save({k: v[0] for k, v in raw.items()}, tmp_path / "one.pt")  # 1-D rows, a torch dict
    emb = load_embedding(tmp_path / "xl-thing.safetensors")
    assert (emb.token, emb.format, emb.num_vectors) == ("xl-thing", fmt, 2)  # no token stored: the file name
    assert list(emb.vectors) == ["clip_l", "clip_g"] and emb.widths == {"clip_l": 768, "clip_g": 1280}
    for key, file_key in zip(("clip_l", "clip_g"), keys):
        assert emb.vectors[key].dtype == torch.float32 and torch.equal(emb.vectors[key], raw[file_key].float())
    one = load_embedding(tmp_path / "one.pt", token="<one>")
    assert (one.token, one.num_vectors) == ("<one>", 1) and torch.equal(one.vectors["clip_g"], raw[keys[1]][:1].float())


def test_sdxl_counts_must_agree_and_width_is_per_encoder(tmp_path):
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, tmp_path / "odd.safetensors")
    with pytest.raises(SdtuneError, match=r"^\S*odd\.safetensors: the text encoders' vector counts differ \(clip_l 2, "
                                          r"clip_g 3\); re-export the embedding$"):
        load_embedding(tmp_path / "odd.safetensors")
    save_file({"clip_l": torch.zeros(1, 768)}, tmp_path / "half.safetensors")  # not a word named "clip_l"
    with pytest.raises(SdtuneError, match=r"^\S*half\.safetensors: holds clip_l but not clip_g; an SDXL embedding "
                                          r"needs a row for each text encoder, re-export it$"):
        load_embedding(tmp_path / "half.safetensors")
    with pytest.raises(ValueError, match="one width per encoder"):
        _ = Embedding("<x>", xl_parts(), "x", "sdxl").width


def test_save_sdxl_as_clip_l_clip_g(tmp_path):
    emb = Embedding("<xl>", xl_parts(3, 2), "trained", "sdxl")
    save_embedding(emb, tmp_path / "xl.safetensors")
    save_embedding(emb, tmp_path / "xl.pt", format="a1111")  # A1111 and ComfyUI read this dict from .pt too
    for state in (load_file(tmp_path / "xl.safetensors"), torch.load(tmp_path / "xl.pt", weights_only=True)):
        assert sorted(state) == ["clip_g", "clip_l"]
        assert all(torch.equal(state[k], emb.vectors[k]) for k in state)
    back = load_embedding(tmp_path / "xl.safetensors")  # the token from sdtune's metadata; A1111 uses the name
    assert (back.token, back.format) == ("<xl>", "sdxl") and all(torch.equal(back.vectors[k], emb.vectors[k])
                                                                 for k in emb.vectors)
    assert load_embedding(tmp_path / "xl.pt").token == "xl"  # no metadata in a .pt: the file name
    assert load_embedding(tmp_path / "xl.safetensors", token="mine").token == "mine"  # FILE:TOKEN still wins
    bare = tmp_path / "other-tool.safetensors"  # the same layout from another tool: the file name
    save_file(load_file(tmp_path / "xl.safetensors"), bare)
    assert load_embedding(bare).token == "other-tool"


class RunsCode:
    """Unpickling this would create a file: proves the loader never executes a pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_unsafe_pickles_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "was-executed"
    torch.save({"<x>": RunsCode(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(SdtuneError, match="refuses to unpickle") as err:
        load_embedding(tmp_path / "evil.pt")
    assert not marker.exists() and "\n" not in str(err.value)

    # the original textual_inversion layout: a ParameterDict plus numpy objects
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(rows(1))})
    torch.save({"string_to_param": params, "string_to_token": {"*": np.int64(265)},
                "extra": collections.OrderedDict(a=np.zeros(2))}, tmp_path / "embeddings.pt")
    with pytest.raises(SdtuneError, match=r"embeddings\.pt: an original textual_inversion embedding.*will not unpickle"):
        load_embedding(tmp_path / "embeddings.pt")


def test_malformed_files(tmp_path):
    save_file({"<a>": rows(), "<b>": rows()}, tmp_path / "two.safetensors")
    with pytest.raises(SdtuneError, match=r"two\.safetensors: not a textual-inversion layout \(keys: <a>, <b>\)"):
        load_embedding(tmp_path / "two.safetensors")
    # a LoRA (of any layout) or a checkpoint given as an embedding: said as what it is
    save_file({"lora_unet_x.lora_down.weight": rows(), "lora_unet_x.alpha": torch.tensor(1.0)}, tmp_path / "l.safetensors")
    save_file({"unet:0:up": rows(), "unet:0:down": rows()}, tmp_path / "c.safetensors")
    for name in ("l", "c"):
        with pytest.raises(SdtuneError, match=rf"{name}\.safetensors: this is a LoRA, not an embedding; give it with "
                                              r"--lora \(or <lora:NAME:1> in a prompt\)$"):
            load_embedding(tmp_path / f"{name}.safetensors")
    save_file({"model.diffusion_model.a": rows(), "model.diffusion_model.b": rows()}, tmp_path / "m.safetensors")
    with pytest.raises(SdtuneError, match=r"m\.safetensors: this is a full Stable Diffusion checkpoint, not an "
                                          r"embedding; give it as --model$"):
        load_embedding(tmp_path / "m.safetensors")
    save_file({"<c>": torch.zeros(1, 2, D)}, tmp_path / "cube.safetensors")
    with pytest.raises(SdtuneError, match=r"shape \(1, 2, 64\)"):
        load_embedding(tmp_path / "cube.safetensors")
    save_file({"<n>": torch.full((1, D), float("nan"))}, tmp_path / "nan.safetensors")
    with pytest.raises(SdtuneError, match="NaN"):
        load_embedding(tmp_path / "nan.safetensors")
    save_file({"two words": rows()}, tmp_path / "spaced.safetensors")
    with pytest.warns(SdtuneWarning, match=r"'two words' is not one word.*'spaced'.*spaced\.safetensors:TOKEN"):
        assert load_embedding(tmp_path / "spaced.safetensors").token == "spaced"  # the file name, as in A1111
    with pytest.raises(SdtuneError, match=r"'two words' is empty or has spaces"):
        load_embedding(tmp_path / "spaced.safetensors", token="two words")
    assert load_embedding(tmp_path / "spaced.safetensors", token="<ok>").token == "<ok>"
    (tmp_path / "junk.pt").write_bytes(b"not a weight file at all")
    with pytest.raises(SdtuneError, match=r"junk\.pt: "):
        load_embedding(tmp_path / "junk.pt")
    with pytest.raises(SdtuneError, match="no such file"):
        load_embedding(tmp_path / "missing.safetensors")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(SdtuneError, match="learned_embeds.safetensors or learned_embeds.bin"):
        load_embedding(tmp_path / "empty-dir")


def test_save_diffusers_and_a1111_round_trip(tmp_path):
    emb = Embedding("<mine>", rows(3, 7), "trained", "diffusers",
                    training={"step": "500", "base_model": "tiny", "base_model_hash": "0123456789"})
    save_embedding(emb, tmp_path / "learned_embeds.safetensors")
    save_embedding(emb, tmp_path / "learned_embeds.bin")
    save_embedding(emb, tmp_path / "mine.pt", format="a1111")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learned_embeds.bin", "learned_embeds.safetensors", "mine.pt"]

    for name in ("learned_embeds.safetensors", "learned_embeds.bin"):
        back = load_embedding(tmp_path / name)
        assert (back.token, back.format) == ("<mine>", "diffusers") and torch.equal(back.vectors, emb.vectors)
    # the training facts ride in the safetensors metadata (a .bin pickle has no place for them)
    assert load_embedding(tmp_path / "learned_embeds.safetensors").training == emb.training
    assert load_embedding(tmp_path / "learned_embeds.bin").training == {}

    raw = torch.load(tmp_path / "mine.pt", weights_only=True)  # plain containers only
    assert raw["name"] == "<mine>" and raw["step"] == 500 and raw["string_to_token"] == {"*": 265}
    # A1111's own fields for the base model it was trained on
    assert (raw["sd_checkpoint"], raw["sd_checkpoint_name"]) == ("0123456789", "tiny")
    assert type(raw["string_to_param"]["*"]) is torch.Tensor and torch.equal(raw["string_to_param"]["*"], emb.vectors)
    back = load_embedding(tmp_path / "mine.pt")
    assert (back.token, back.format) == ("<mine>", "a1111") and torch.equal(back.vectors, emb.vectors)
    assert back.training == emb.training
    for name in ("mine.pt", "learned_embeds.bin"):
        assert passes_a1111_safe_loader(tmp_path / name), name
    with pytest.raises(SdtuneError, match="unknown embedding format 'ckpt'"):
        save_embedding(emb, tmp_path / "x.ckpt", format="ckpt")


def passes_a1111_safe_loader(path) -> bool:
    """A1111's ``modules/safe.py`` check, as it reads files before unpickling them: a zip archive may hold only
    data.pkl, version and data/N (current torch's zip format adds .format_version, byteorder...: refused, and the
    embedding is dropped unread); a legacy file's five pickles must use only the globals it allows."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return all(re.fullmatch(r"[^/]+/((data/\d+)|version|(data\.pkl))", n) for n in z.namelist())
    allowed = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage")}

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(f"{module}.{name}")
            return super().find_class(module, name)

        def persistent_load(self, saved_id):
            return torch.storage.TypedStorage(_internal=True)
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated (A1111 makes it all the same)
        unpickler = Restricted(f)
        for _ in range(5):
            unpickler.load()
    return True

