"""kohya's sshs_* hashes in written LoRAs, inspect's AutoV2/AutoV3, and A1111's ``Lora hashes`` infotext field,
each against a hashlib computation done here on the file's bytes."""

import hashlib
import json
import re

import torch
from safetensors import safe_open
from safetensors.torch import save as st_bytes
from safetensors.torch import save_file

from sdtune import api, safeio
from sdtune.cli import main
from sdtune.generate import parse_infotext
from sdtune.lora import hashes
from sdtune.lora.formats import convert, load_lora, save_lora
from sdtune.lora.neutral import Adapter, Lora
from sdtune.models import load_base

PATHS = [f"down_blocks.0.attentions.{a}.transformer_blocks.0.attn{n}.to_{p}"
         for a in (0, 1) for n in (1,) for p in ("q", "k", "v", "out.0")]


def big_lora(seed=0, rank=64) -> Lora:
    """Over 1 MiB of tensors, so the legacy hash reads real bytes (64 KiB at 1 MiB)."""
    g = torch.Generator().manual_seed(seed)
    lora = Lora(metadata={"ss_output_name": "big", "user_note": "x"})
    for p in PATHS:
        lora.modules["unet"][p] = Adapter("lora", {"down": torch.randn(rank, 320, generator=g),
                                                   "up": torch.randn(320, rank, generator=g)}, alpha=8.0)
    return lora


def data_sha(path) -> str:
    raw = path.read_bytes()
    return hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()


def header(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def tensors(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_saved_lora_carries_kohya_hashes(tmp_path):
    out = tmp_path / "big.safetensors"
    save_lora(big_lora(), out)
    meta = header(out)
    assert out.stat().st_size > 0x110000
    assert meta["sshs_model_hash"] == data_sha(out) == hashes.tensor_sha256(out)
    # legacy: the 64 KiB at 1 MiB of the same tensors serialised with only the ss_* metadata, 8 hex
    ss = {k: v for k, v in meta.items() if k.startswith("ss_")}
    assert "user_note" in meta and "user_note" not in ss
    raw = st_bytes(tensors(out), metadata=ss)
    assert meta["sshs_legacy_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    assert len(meta["sshs_legacy_hash"]) == 8 and len(meta["sshs_model_hash"]) == 64
    # the diffusers layout's ss_* entries are its base's alone (A1111 reads them)
    plain = tmp_path / "plain.safetensors"
    save_lora(Lora(modules=big_lora().modules), plain, format="diffusers")
    meta = header(plain)
    ss = {k: v for k, v in meta.items() if k.startswith("ss_")}
    assert set(ss) == {"ss_base_model_version", "ss_v2"}
    raw = st_bytes(tensors(plain), metadata=ss)
    assert meta["sshs_legacy_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    # no ss_* entries (another tool's file): kohya still serialises an empty header, which moves the data
    raw = st_bytes(tensors(plain), metadata={})
    assert hashes.sshs_hashes(tensors(plain), {})["sshs_legacy_hash"] == \
        hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]


def test_editing_metadata_keeps_the_tensor_hash(tmp_path):
    out, edited = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_lora(big_lora(), out)
    meta = header(out)
    save_file(tensors(out), edited, metadata={**meta, "user_note": "a much longer note " * 50, "ss_x": "1"})
    assert hashes.tensor_sha256(edited) == hashes.tensor_sha256(out) == meta["sshs_model_hash"]
    assert hashes.file_sha256(edited) != hashes.file_sha256(out)  # AutoV2 does change
    # re-saving through sdtune: user metadata does not move either sshs hash, an ss_ entry moves only the legacy one
    again = tmp_path / "c.safetensors"
    save_lora(load_lora(edited), again, metadata={"user_note": "other"})
    assert header(again)["sshs_model_hash"] == meta["sshs_model_hash"]
    lora = big_lora()
    lora.metadata["user_note"] = "changed"
    save_lora(lora, tmp_path / "d.safetensors")
    assert header(tmp_path / "d.safetensors")["sshs_legacy_hash"] == meta["sshs_legacy_hash"]
    lora.metadata["ss_output_name"] = "renamed " * 9  # past the header's 8-byte padding
    save_lora(lora, tmp_path / "e.safetensors")
    e = header(tmp_path / "e.safetensors")
    assert e["sshs_model_hash"] == meta["sshs_model_hash"] and e["sshs_legacy_hash"] != meta["sshs_legacy_hash"]


def test_convert_writes_fresh_hashes(tmp_path):
    src = tmp_path / "k.safetensors"
    save_lora(big_lora(), src)
    dst = tmp_path / "d.safetensors"
    convert(src, dst, to="diffusers")
    assert header(dst)["sshs_model_hash"] == data_sha(dst) != header(src)["sshs_model_hash"]


def test_inspect_prints_autov2_and_autov3(tmp_path, capsys):
    out = tmp_path / "big.safetensors"
    save_lora(big_lora(), out)
    full = hashlib.sha256(out.read_bytes()).hexdigest()
    assert main(["inspect", str(out), "--json"]) == 0
    h = json.loads(capsys.readouterr().out)["hashes"]
    assert h == {"sha256": full, "autov2": full[:10], "tensor_sha256": data_sha(out), "autov3": data_sha(out)[:12]}
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"^AutoV2 +{full[:10]}$", text, re.M)
    assert re.search(rf"^AutoV3 +{data_sha(out)[:12]} ", text, re.M)


def test_generated_png_names_lora_hashes(tmp_path):
    base = load_base("tiny-random", device="cpu", dtype="fp32")
    lora = Lora()
    g = torch.Generator().manual_seed(0)
    for p in PATHS[:2]:
        width = base.unet.get_submodule(p).in_features
        lora.modules["unet"][p] = Adapter("lora", {"down": torch.randn(2, width, generator=g),
                                                   "up": torch.randn(width, 2, generator=g)})
    (tmp_path / "loras").mkdir()
    style = tmp_path / "loras" / "style.safetensors"
    save_lora(lora, style)
    base.loras.add("mine", style, 0.5)
    [result] = api.generate(base, "a red circle, <lora:style:0.7>", seed=1, steps=2, lora_dirs=[tmp_path / "loras"],
                            progress=False)
    short = data_sha(style)[:12]
    # "mine" is its file's stem in the PNG (a prompt tag finds it by that), and one file is one hash entry
    assert f'Lora hashes: "style: {short}"' in result.infotext
    assert parse_infotext(result.infotext)["Lora hashes"] == f"style: {short}"
    assert result.infotext.startswith("a red circle, <lora:style:0.7> <lora:style:0.5>\n")
    assert hashes.lora_hashes_field([("a:b, c", style)]) == f"ab c: {short}"  # as A1111 cleans a name for the field
    # TI hashes likewise (the file's whole sha256)
    assert hashes.ti_hashes_field([("a:b, c", style)]) == f"ab c: {hashes.file_sha256(style)[:12]}"


def test_same_tensors_and_metadata_give_the_same_autov2(tmp_path):
    # the header's metadata is written sorted, escapes and non-ASCII text included, and reads back unchanged
    meta = {f"k{i}": f"é\n\"/\\\x01 {i}" for i in range(40)} | {"ss_output_name": "日本"}
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.float16)}
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for p in paths:
        safeio.atomic_save_safetensors(tensors, p, metadata=dict(reversed(meta.items())) if p.stem == "1" else meta)
    assert len({hashes.file_sha256(p) for p in paths}) == 1
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == meta and torch.equal(f.get_tensor("b"), tensors["b"])
    assert st_bytes(tensors, metadata=meta)[-16:] == paths[0].read_bytes()[-16:]  # the data did not move


def test_tensor_hash_by_content_and_a_file_without_tensors(tmp_path, capsys):
    """A safetensors file under another suffix (a .pti) has its AutoV3 too; one holding no tensor is said so."""
    pti = tmp_path / "concept.pti"
    save_file({"emb_params": torch.randn(2, 64)}, str(pti))
    data = pti.read_bytes()
    after = 8 + int.from_bytes(data[:8], "little")
    assert hashes.describe(pti)["tensor_sha256"] == hashlib.sha256(data[after:]).hexdigest()
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty), metadata={"ss_network_dim": "4"})
    assert main(["inspect", str(empty)]) == 2
    assert capsys.readouterr().err.strip().endswith("empty.safetensors: holds no tensors at all (metadata alone); "
                                                    "re-download or re-export it")
