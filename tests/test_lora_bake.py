"""Baking LoRAs into a checkpoint: streamed single file and diffusers folder, and what a reload gives back."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune import api, models
from sdtune.lora import bake
from sdtune.lora.formats import save_lora
from sdtune.lora.neutral import Adapter, Lora
from sdtune.lora.patch import LoraSet
from sdtune.safeio import SdtuneError

EXTRA = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1234, dtype=torch.int32),
         "alphas_cumprod": torch.linspace(0.99, 0.01, 1000)}


def random_lora(base, seed, rank=4, alpha=3.0, conv=False) -> Lora:
    g = torch.Generator().manual_seed(seed)
    lora = Lora(format="test")
    for comp in ("unet", "text_encoder"):
        for path, m in getattr(base, comp).named_modules():
            if isinstance(m, torch.nn.Linear) and any(s in path for s in ("attn1.", "attn2.", "ff.net", "self_attn.", "mlp.")):
                lora.modules[comp][path] = Adapter("lora", {"down": torch.randn(rank, m.in_features, generator=g) * 0.2,
                                                            "up": torch.randn(m.out_features, rank, generator=g) * 0.2}, alpha)
    if conv:  # a LoCon 3x3 resnet conv and a 1x1 proj_in
        for path in ("down_blocks.1.resnets.0.conv1", "up_blocks.2.attentions.1.proj_in"):
            w = base.unet.get_submodule(path).weight
            lora.modules["unet"][path] = Adapter("lora", {
                "down": torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * 0.2,
                "up": torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.2}, alpha)
    return lora


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    """A tiny single-file checkpoint in LDM layout, fp32, with two non-model keys and custom metadata."""
    d = tmp_path_factory.mktemp("bake")
    path = d / "base.safetensors"
    models.save_single_file(models.load_base("tiny-random", device="cpu", dtype="fp32"), path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    save_file({**load_file(str(path)), **EXTRA}, str(path), metadata={**meta, "modelspec.title": "tiny"})
    return path


@pytest.fixture(scope="module")
def loras(base_file, tmp_path_factory):
    base = models.load_base(str(base_file), device="cpu", dtype="fp32")
    a = random_lora(base, 1, conv=True)
    b = random_lora(base, 2, rank=8, alpha=16.0)
    kohya = tmp_path_factory.mktemp("loras") / "b_kohya.safetensors"
    save_lora(b, kohya, format="kohya")
    return a, kohya


def patched_in_memory(spec, pairs, dtype="fp32"):
    """The reference: load the base, add the LoRAs with LoraSet, named as generate names them (a file by its stem;
    LoraSet sums by name)."""
    base = models.load_base(str(spec), device="cpu", dtype=dtype)
    s = LoraSet.attach(base)
    for i, (src, w) in enumerate(pairs):
        name = Path(src).stem if isinstance(src, (str, Path)) else f"lora{i}"
        s.add(name, src, *((w,) if not isinstance(w, tuple) else w))
    return base


def assert_same_weights(got, want, comps=("unet", "text_encoder", "vae")):
    """Bit for bit: the bake runs the same float32 computation (same kernel, same single-threaded GEMM, same
    order of the LoRAs) as the in-memory patch, so nothing may differ."""
    for comp in comps:
        mine, ref = getattr(got, comp).state_dict(), getattr(want, comp).state_dict()
        assert mine.keys() == ref.keys()
        for k in ref:
            assert mine[k].dtype == ref[k].dtype and torch.equal(mine[k], ref[k]), f"{comp}.{k}"


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def base_folder(base_file, tmp_path_factory):
    """The same model as a diffusers folder, as save_diffusers writes it."""
    out = tmp_path_factory.mktemp("folder") / "tiny"
    return models.save_diffusers(models.load_base(str(base_file), device="cpu", dtype="fp32"), out)


@pytest.fixture(scope="module")
def sharded_folder(base_folder, tmp_path_factory):
    """base_folder with the UNet and text encoder in 3 shards each (text encoder keys named the hub's way,
    ``text_model.*``), plus a README, an fp16 UNet variant and a hidden folder."""
    out = tmp_path_factory.mktemp("sharded") / "tiny"
    shutil.copytree(base_folder, out)
    for comp, stem, prefix in (("unet", "diffusion_pytorch_model", ""), ("text_encoder", "model", "text_model.")):
        state, meta = tensors(out / comp / f"{stem}.safetensors")
        (out / comp / f"{stem}.safetensors").unlink()
        keys = sorted(state)
        weight_map = {}
        for n in range(3):
            shard = f"{stem}-0000{n + 1}-of-00003.safetensors"
            part = {prefix + k: state[k] for k in keys[n::3]}
            save_file(part, str(out / comp / shard), metadata=meta)
            weight_map |= dict.fromkeys(part, shard)
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / comp / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    save_file({"conv_in.weight": torch.zeros(1)}, str(out / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    (out / "README.md").write_text("a model card\n")
    (out / ".cache").mkdir()
    (out / ".cache" / "lock").write_text("x")
    return out


def test_single_file_stream_equals_in_memory_patch_and_keeps_layout(base_file, loras, tmp_path, monkeypatch):
    pairs = [(loras[0], 0.5), (loras[1], (1.0, -0.5))]
    want = patched_in_memory(base_file, pairs)
    monkeypatch.setattr(models, "load_base", lambda *a, **k: pytest.fail("the streaming path must not load the model"))
    out = bake.merge(str(base_file), pairs, tmp_path / "merged.safetensors", fmt="single")
    monkeypatch.undo()

    before, after = load_file(str(base_file)), load_file(str(out))
    assert list(before) == list(after) or set(before) == set(after)
    for k, v in EXTRA.items():
        assert torch.equal(after[k], v)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in changed
    assert "model.diffusion_model.input_blocks.3.0.in_layers.2.weight" in changed  # down_blocks.1.resnets.0.conv1
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight" in changed
    assert all(k.endswith(".weight") and not k.startswith("first_stage_model.") for k in changed)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "tiny"
    assert [m["te_weight"] for m in json.loads(meta["sdtune.merged_loras"])] == [0.5, -0.5]

    assert_same_weights(models.load_base(str(out), device="cpu", dtype="fp32"), want)


def test_single_file_stream_to_fp16(base_file, loras, tmp_path):
    pairs = [(loras[1], 0.8)]
    out = bake.merge(base_file, pairs, tmp_path / "half.safetensors", fmt="single", dtype="fp16")
    after, before = load_file(str(out)), load_file(str(base_file))
    assert after["model_ema.num_updates"].dtype == torch.int32 and after["model_ema.decay"].dtype == torch.float16
    want = patched_in_memory(base_file, pairs)
    key = "model.diffusion_model.output_blocks.2.1.transformer_blocks.0.ff.net.2.weight"  # up_blocks.1.attentions.0
    ref = want.unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2").weight.half()
    assert after[key].dtype == torch.float16 and torch.equal(after[key], ref)
    assert not torch.equal(after[key].float(), before[key])


def test_diffusers_folder_merge_reloads_to_the_patched_weights(base_file, loras, tmp_path):
    pairs = [(loras[0], 1.2), (loras[1], -0.3)]
    base = models.load_base(str(base_file), device="cpu", dtype="fp32")
    pristine = {c: {k: v.clone() for k, v in getattr(base, c).state_dict().items()} for c in ("unet", "text_encoder")}
    out = bake.merge(base, pairs, tmp_path / "merged", fmt="diffusers")
    assert (out / "model_index.json").is_file()
    for comp in ("unet", "text_encoder"):  # a Base passed in is given back exactly as it was
        for k, v in getattr(base, comp).state_dict().items():
            assert torch.equal(v, pristine[comp][k])
    want = patched_in_memory(base_file, pairs)
    assert_same_weights(models.load_base(str(out), device="cpu", dtype="fp32"), want, comps=("unet", "text_encoder"))
    for comp in ("unet", "text_encoder"):
        ref = getattr(want, comp).state_dict()
        assert any(not torch.equal(ref[k], pristine[comp][k]) for k in ref)


def test_loaded_base_to_single_file(base_file, loras, tmp_path):
    pairs = [(loras[1], 0.7)]
    base = models.load_base(str(base_file), device="cpu", dtype="fp32")
    out = bake.merge(base, pairs, tmp_path / "m.safetensors", fmt="single")
    streamed = bake.merge(base_file, pairs, tmp_path / "s.safetensors", fmt="single")
    a, b = load_file(str(out)), load_file(str(streamed))
    for k in a:  # the streamed file has the extra keys on top
        assert torch.equal(a[k], b[k]), k


def test_bad_inputs_fail_clearly_and_leave_no_file(base_file, loras, tmp_path):
    wrong = Lora()
    wrong.modules["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] = Adapter(
        "lora", {"down": torch.zeros(4, 1024), "up": torch.zeros(32, 4)})
    with pytest.raises(SdtuneError, match="to_k"):
        bake.merge(base_file, [(wrong, 1.0)], tmp_path / "x.safetensors", fmt="single")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SdtuneError, match="diffusers or single"):
        bake.merge(base_file, [(loras[1], 1.0)], tmp_path / "x", fmt="ckpt")
    with pytest.raises(SdtuneError, match=r"\.safetensors"):
        bake.merge(base_file, [(loras[1], 1.0)], tmp_path / "x.ckpt", fmt="single")
    with pytest.raises(SdtuneError, match="input checkpoint"):
        bake.merge(base_file, [(loras[1], 1.0)], base_file, fmt="single")
    # the LoRA as --out: it was replaced by the checkpoint (and the command said nothing)
    lora_copy = tmp_path / "copy.safetensors"
    lora_copy.write_bytes(loras[1].read_bytes())
    with pytest.raises(SdtuneError, match=rf"^{lora_copy}: is an input of this command \({lora_copy}\); write the "
                                          r"merge to a new file$"):
        bake.merge(base_file, [(lora_copy, 1.0)], lora_copy, fmt="single")
    # a LoRA kept in the model folder --out names: the folder is replaced whole, and the LoRA went with it
    folder = bake.merge(base_file, [(loras[1], 1.0)], tmp_path / "merged")
    kept = folder / "mine.safetensors"
    kept.write_bytes(loras[1].read_bytes())
    with pytest.raises(SdtuneError, match=r"merged: holds .*mine\.safetensors, an input of this command, and a "
                                          r"merge replaces the whole folder"):
        bake.merge(base_file, [(kept, 1.0)], folder)
    assert kept.read_bytes() == loras[1].read_bytes() == lora_copy.read_bytes()
    kept.unlink()
    lora_copy.unlink()
    shutil.rmtree(folder)
    with pytest.raises(SdtuneError, match=r"adapter weight \(1\.0, 2\.0, 3\.0, 4\.0\): give one number"):
        bake.merge(base_file, [(loras[1], (1.0, 2.0, 3.0, 4.0))], tmp_path / "x.safetensors", fmt="single")
    assert list(tmp_path.iterdir()) == []
    # a cut LoRA file: one line naming it (its header was read unguarded, a traceback)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(loras[1].read_bytes()[:200])
    with pytest.raises(SdtuneError, match=rf"^{cut}: not a readable safetensors file"):
        bake.merge(base_file, [(cut, 1.0)], tmp_path / "x.safetensors", fmt="single")
    cut.unlink()
    assert list(tmp_path.iterdir()) == []
    # a weight no float can hold once multiplied (1e308 typed in the UI's merge box): every image would be black
    for fmt, dtype, out in (("single", None, "x.safetensors"), ("single", "fp16", "x.safetensors"),
                            ("diffusers", None, "folder")):
        with pytest.raises(SdtuneError, match=r"^\S+: the merge makes it inf or NaN in (F32|F16) \(LoRA weight "
                                              r"1e\+308\); a weight far too large \(usual: -2 to 2\)"):
            bake.merge(base_file, [(loras[1], 1e308)], tmp_path / out, fmt=fmt, dtype=dtype)
    with pytest.raises(SdtuneError, match=r"^unet\.\S+: the merge makes it inf or NaN in float32 \(LoRA weight "
                                          r"1e\+308\)"):  # the loaded route (a built-in model)
        bake.merge("tiny-random", [(loras[1], 1e308)], tmp_path / "x.safetensors", fmt="single")
    # finite in the float32 sum, past fp16's range once saved in it: checked in the saved dtype, nothing written
    with pytest.raises(SdtuneError, match=r"^unet\.\S+: the merge makes it inf or NaN in float16 \(LoRA weight "
                                          r"1e\+08\)"):
        bake.merge("tiny-random", [(loras[1], 1e8)], tmp_path / "x.safetensors", fmt="single", dtype="fp16")
    assert list(tmp_path.iterdir()) == []


def test_truncated_checkpoint_fails_clearly_and_leaves_no_file(base_file, loras, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = base_file.read_bytes()
    cut.write_bytes(data[: len(data) - 4096])
    with pytest.raises(SdtuneError, match="truncated"):
        bake.merge(cut, [(loras[1], 1.0)], tmp_path / "out.safetensors", fmt="single")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.safetensors"]


def test_folder_to_folder_streams_the_in_memory_patch(base_folder, loras, tmp_path, monkeypatch):
    pairs = [(loras[0], 0.5), (loras[1], (1.0, -0.5))]
    monkeypatch.setattr(models, "load_base", lambda *a, **k: pytest.fail("the streaming path must not load the model"))
    out = bake.merge(base_folder, pairs, tmp_path / "merged")
    monkeypatch.undo()

    before, after = files_of(base_folder), files_of(out)
    assert before.keys() == after.keys()
    for name in before:  # configs, tokenizer, scheduler, VAE: copied as they are
        if name not in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
            assert after[name].read_bytes() == before[name].read_bytes(), name
    changed = set()
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        old, _ = tensors(before[name])
        new, meta = tensors(after[name])
        assert old.keys() == new.keys() and meta["format"] == "pt"
        assert [m["te_weight"] for m in json.loads(meta["sdtune.merged_loras"])] == [0.5, -0.5]
        changed |= {k for k in old if not torch.equal(old[k], new[k])}
    assert {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "down_blocks.1.resnets.0.conv1.weight",  # the LoCon conv
            "encoder.layers.0.mlp.fc1.weight"} <= changed
    assert all(k.endswith(".weight") for k in changed)
    assert_same_weights(models.load_base(str(out), device="cpu", dtype="fp32"), patched_in_memory(base_folder, pairs))


def test_folder_to_folder_bias_and_norm_changes_are_the_in_memory_patch(base_folder, tmp_path):
    base = models.load_base(str(base_folder), device="cpu", dtype="fp32")
    lora = Lora(format="test")
    g = torch.Generator().manual_seed(4)
    for comp, path, kind in (("unet", "down_blocks.1.resnets.0.conv1", "diff"), ("unet", "mid_block.resnets.0.norm2", "norm"),
                             ("text_encoder", "encoder.layers.0.mlp.fc1", "diff"),
                             ("text_encoder", "final_layer_norm", "norm")):
        m = getattr(base, comp).get_submodule(path)
        roles = ("diff", "bias") if kind == "diff" else ("weight", "bias")
        lora.modules[comp][path] = Adapter(kind, {r: torch.randn(t.shape, generator=g) * 0.1
                                                  for r, t in zip(roles, (m.weight, m.bias))})
    pairs = [(lora, (0.8, -0.5))]
    out = bake.merge(base_folder, pairs, tmp_path / "merged")
    old, _ = tensors(base_folder / "unet" / "diffusion_pytorch_model.safetensors")
    new, _ = tensors(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {k for k in old if not torch.equal(old[k], new[k])} == {
        "down_blocks.1.resnets.0.conv1.weight", "down_blocks.1.resnets.0.conv1.bias",
        "mid_block.resnets.0.norm2.weight", "mid_block.resnets.0.norm2.bias"}
    assert_same_weights(models.load_base(str(out), device="cpu", dtype="fp32"), patched_in_memory(base_folder, pairs))


def test_folder_output_loads_in_diffusers(base_folder, loras, tmp_path):
    from diffusers import StableDiffusionPipeline

    pairs = [(loras[1], 0.8)]
    out = bake.merge(base_folder, pairs, tmp_path / "merged")
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    want = patched_in_memory(base_folder, pairs)
    for comp in ("unet", "text_encoder"):
        mine, ref = getattr(pipe, comp).state_dict(), getattr(want, comp).state_dict()
        for k in ref:
            assert torch.equal(mine[k], ref[k]), f"{comp}.{k}"


def test_sharded_folder_keeps_its_shards(sharded_folder, loras, tmp_path):
    pairs = [(loras[0], 1.0), (loras[1], 0.6)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = bake.merge(sharded_folder, pairs, tmp_path / "merged")
    assert any("diffusion_pytorch_model.fp16.safetensors" in str(w.message) for w in caught)
    names = set(files_of(out))
    assert names == set(files_of(sharded_folder)) - {"unet/diffusion_pytorch_model.fp16.safetensors", ".cache/lock"}
    for comp, stem in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        index = f"{comp}/{stem}.safetensors.index.json"
        assert (out / index).read_bytes() == (sharded_folder / index).read_bytes()
        weight_map = json.loads((out / index).read_text())["weight_map"]
        for shard in set(weight_map.values()):  # every key is still in the shard the index names
            assert {k for k, v in weight_map.items() if v == shard} == set(tensors(out / comp / shard)[0])
    assert_same_weights(models.load_base(str(out), device="cpu", dtype="fp32"),
                        patched_in_memory(sharded_folder, pairs))


def halved_as_patched(out: Path, want) -> None:
    """Every float weight of the folder ``out`` is fp16 and equals the float32 patch ``want`` cast once, and each
    text encoder's config says so (transformers loads a folder in the dtype its config names)."""
    for comp in ("unet", "text_encoder", "vae"):
        stem = bake.COMPONENT_WEIGHTS[comp]
        state = {}
        for shard in sorted((out / comp).glob(f"{stem}*.safetensors")):
            state.update(tensors(shard)[0])
        ref = getattr(want, comp).state_dict()
        if comp == "text_encoder":  # the file's names may be the hub's (text_model.*)
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
            ref = {k.removeprefix("text_model."): v for k, v in ref.items()}
        assert state.keys() == ref.keys(), comp
        for k, v in ref.items():
            assert state[k].dtype == torch.float16 and torch.equal(state[k], v.half()), f"{comp}.{k}"
    assert json.loads((out / "text_encoder" / "config.json").read_text())["dtype"] == "float16"
    loaded = models.load_base(str(out), device="cpu", dtype="fp16")
    assert torch.equal(loaded.unet.conv_in.weight, want.unet.conv_in.weight.half())


def test_save_dtype_halves_a_folder_on_every_route(base_file, base_folder, sharded_folder, loras, tmp_path):
    pairs = [(loras[0], 0.7), (loras[1], 1.0)]
    want = patched_in_memory(base_file, pairs)
    halved_as_patched(bake.merge(base_folder, pairs, tmp_path / "from-folder", dtype="fp16"), want)
    halved_as_patched(bake.merge(base_file, pairs, tmp_path / "from-file", dtype="fp16"), want)
    with pytest.warns(UserWarning, match="diffusion_pytorch_model.fp16.safetensors"):  # a variant left out
        out = bake.merge(sharded_folder, pairs, tmp_path / "from-shards", dtype="fp16")
    halved_as_patched(out, want)
    for comp, stem in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        index = json.loads((out / comp / f"{stem}.safetensors.index.json").read_text())
        shards = [tensors(out / comp / s)[0] for s in sorted(set(index["weight_map"].values()))]
        assert index["metadata"]["total_size"] == sum(v.nbytes for state in shards for v in state.values())
    base = models.load_base(str(base_file), device="cpu", dtype="fp32")  # the loaded route
    pristine = {k: v.clone() for k, v in base.unet.state_dict().items()}
    halved_as_patched(bake.merge(base, pairs, tmp_path / "from-loaded", dtype="fp16"), want)
    assert all(v.dtype == torch.float32 and torch.equal(v, pristine[k]) for k, v in base.unet.state_dict().items())


def test_fp16_folder_stays_fp16_and_matches_an_fp16_patch(base_folder, loras, tmp_path):
    half = models.save_diffusers(models.load_base(str(base_folder), device="cpu", dtype="fp16"), tmp_path / "half")
    pairs = [(loras[0], 0.7), (loras[1], 1.0)]
    out = bake.merge(half, pairs, tmp_path / "merged")
    state, _ = tensors(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in state.values()} == {torch.float16}
    # write_patched sums in float32 and casts once, in memory as in the bake
    assert_same_weights(models.load_base(str(out), device="cpu", dtype="fp16"),
                        patched_in_memory(half, pairs, dtype="fp16"))


def test_single_file_to_folder_streams_the_in_memory_patch(base_file, base_folder, loras, tmp_path, monkeypatch):
    pairs = [(loras[0], (-0.4, 0.0)), (loras[1], (1.3, 0.0))]
    monkeypatch.setattr(models, "load_base", lambda *a, **k: pytest.fail("the streaming path must not load the model"))
    out = bake.merge(base_file, pairs, tmp_path / "merged", fmt="diffusers")
    monkeypatch.undo()

    before, after = files_of(base_folder), files_of(out)  # base_folder: what save_diffusers writes for this model
    assert before.keys() == after.keys()
    for name in before:
        if not name.endswith(".safetensors"):
            assert after[name].read_bytes() == before[name].read_bytes(), name
    vae_before, _ = tensors(before["vae/diffusion_pytorch_model.safetensors"])
    vae_after, _ = tensors(after["vae/diffusion_pytorch_model.safetensors"])
    assert vae_before.keys() == vae_after.keys()
    assert all(torch.equal(vae_before[k], vae_after[k]) for k in vae_before)  # 1x1 conv attention -> linear
    text_before, _ = tensors(before["text_encoder/model.safetensors"])
    text_after, meta = tensors(after["text_encoder/model.safetensors"])
    assert all(torch.equal(text_before[k], text_after[k]) for k in text_before)  # text-encoder weights 0.0
    assert json.loads(meta["sdtune.merged_loras"])[1]["te_weight"] == 0.0
    got = models.load_base(str(out), device="cpu", dtype="fp32")
    assert_same_weights(got, patched_in_memory(base_file, pairs))


def test_folder_merge_errors_leave_nothing_behind(base_folder, sharded_folder, loras, tmp_path):
    wrong = Lora()
    wrong.modules["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] = Adapter(
        "lora", {"down": torch.zeros(4, 1024), "up": torch.zeros(32, 4)})
    with pytest.raises(SdtuneError, match="to_k"):
        bake.merge(base_folder, [(wrong, 1.0)], tmp_path / "x")
    with pytest.raises(SdtuneError, match=r"is \(in\) the input model"):
        bake.merge(base_folder, [(loras[1], 1.0)], base_folder)
    with pytest.raises(SdtuneError, match=r"is \(in\) the input model"):
        bake.merge(base_folder, [(loras[1], 1.0)], base_folder / "merged")
    assert not (base_folder / "merged").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(SdtuneError, match="not a diffusers model folder"):
        bake.merge(base_folder, [(loras[1], 1.0)], tmp_path / "taken")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SdtuneError, match="file: is a file, not a folder"):  # said before the bake
        bake.merge(base_folder, [(loras[1], 1.0)], tmp_path / "file")
    with pytest.raises(SdtuneError, match=r"unknown dtype 'fp12'; use fp32, fp16 or bf16"):
        bake.merge(base_folder, [(loras[1], 1.0)], tmp_path / "x", dtype="fp12")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken"]

    cut = tmp_path / "cut"
    shutil.copytree(sharded_folder, cut)
    shard = cut / "unet" / "diffusion_pytorch_model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    with pytest.raises(SdtuneError, match="diffusion_pytorch_model-00002-of-00003.safetensors: truncated"):
        bake.merge(cut, [(loras[1], 1.0)], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "file", "taken"]


def test_a_new_merge_replaces_an_old_one(base_folder, loras, tmp_path):
    out = bake.merge(base_folder, [(loras[1], 1.0)], tmp_path / "merged")
    (out / "notes.txt").write_text("kept by the user")
    # a file the new merge does not write would be deleted with the old folder: refused, after the bake but
    # before anything is replaced
    with pytest.raises(SdtuneError, match=r"merged: holds 1 file\(s\) the new folder does not have \(notes.txt\)"):
        bake.merge(base_folder, [(loras[1], -1.0)], out)
    assert (out / "notes.txt").read_text() == "kept by the user"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary folder left
    (out / "notes.txt").unlink()
    bake.merge(base_folder, [(loras[1], -1.0)], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert_same_weights(models.load_base(str(out), device="cpu", dtype="fp32"),
                        patched_in_memory(base_folder, [(loras[1], -1.0)]), comps=("unet",))


def test_folder_with_bin_weights_is_loaded_patched_and_saved(base_folder, loras, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(base_folder, legacy)
    weights = legacy / "text_encoder" / "model.safetensors"
    torch.save(load_file(str(weights)), legacy / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    pairs = [(loras[1], 0.9)]
    out = bake.merge(legacy, pairs, tmp_path / "merged")
    assert (out / "text_encoder" / "model.safetensors").is_file()  # written by save_diffusers
    assert_same_weights(models.load_base(str(out), device="cpu", dtype="fp32"), patched_in_memory(legacy, pairs))


def test_without_kernel_copy_or_preadv_the_bytes_are_the_same(base_folder, loras, tmp_path, monkeypatch):
    pairs = [(loras[0], 0.3), (loras[1], 1.0)]
    fast = bake.merge(base_folder, pairs, tmp_path / "fast")

    def no_kernel_copy(*args):
        raise OSError(38, "copy_file_range not supported")

    monkeypatch.setattr(bake.os, "copy_file_range", no_kernel_copy)
    monkeypatch.delattr(bake.os, "preadv")
    slow = bake.merge(base_folder, pairs, tmp_path / "slow")
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (slow / name).read_bytes() == (fast / name).read_bytes()


def test_scratch_lends_within_its_capacity_and_reuses_mappings():
    scratch = bake._Scratch(1000)
    with scratch.lend(600) as a, scratch.lend(300) as b:
        assert (len(a.memory), len(b.memory), scratch.mapped) == (600, 300, 900)
        x = a.new([5], dtype=torch.float32)
        y = a.new([4], dtype=torch.float16)  # after x, at the next 64-byte boundary
        assert y.data_ptr() - x.data_ptr() == 64 and x.data_ptr() % 64 == 0 and a.used == 72
        big = a.new([100], dtype=torch.float64)  # more than is left: from torch instead
        assert big.shape == (100,) and a.used == 72
    with scratch.lend(500) as c:  # the smallest free mapping that is big enough
        assert c.memory is a.memory
    with scratch.lend(2500) as d:  # more than the capacity: alone, after the free mappings are dropped
        assert len(d.memory) == 2500 and scratch.free == [] and scratch.mapped == 2500


def test_a_small_scratch_writes_the_same_bytes(base_folder, loras, tmp_path, monkeypatch):
    """Jobs wait for scratch memory, and those bigger than all of it run alone: the output does not change."""
    pairs = [(loras[0], 0.3), (loras[1], 1.0)]
    roomy = bake.merge(base_folder, pairs, tmp_path / "roomy")
    monkeypatch.setattr(bake, "SCRATCH_BYTES", 300_000)
    tight = bake.merge(base_folder, pairs, tmp_path / "tight")
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (tight / name).read_bytes() == (roomy / name).read_bytes()


def test_the_model_its_folder_and_other_files_are_never_written_over(base_folder, base_file, loras, tmp_path):
    """--out naming a file of the input folder (or any place in it) would corrupt the model; an existing file that
    is no checkpoint (another LoRA, an embedding) is not replaced; an earlier merge is."""
    unet = base_folder / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet.read_bytes()
    with pytest.raises(SdtuneError, match=rf"^{unet}: is \(in\) the input model; write the merge outside it$"):
        bake.merge(base_folder, [(loras[1], 1.0)], unet, fmt="single")
    with pytest.raises(SdtuneError, match=r"merged\.safetensors: is \(in\) the input model"):
        bake.merge(base_folder, [(loras[1], 1.0)], base_folder / "merged.safetensors", fmt="single")
    assert unet.read_bytes() == before and not (base_folder / "merged.safetensors").exists()
    other = tmp_path / "other_lora.safetensors"
    other.write_bytes(loras[1].read_bytes())
    for model in (base_file, base_folder):
        with pytest.raises(SdtuneError, match=r"other_lora\.safetensors: exists and is not a checkpoint"):
            bake.merge(model, [(loras[0], 1.0)], other, fmt="single")
    assert other.read_bytes() == loras[1].read_bytes()
    out = bake.merge(base_file, [(loras[1], 1.0)], tmp_path / "m.safetensors", fmt="single")
    assert bake.merge(base_file, [(loras[1], 0.5)], out, fmt="single") == out  # a rerun replaces its own


def test_stacked_loras_sum_in_the_order_generate_sums_them(base_file, loras, tmp_path):
    """Generation sums LoRAs by name (LoraSet's order, whatever the order they came in: a file's stem), so a bake
    of the same --lora list sums them so too and has the same bits: here the first given sorts last."""
    zeta, alpha = tmp_path / "zeta.safetensors", tmp_path / "alpha.safetensors"
    zeta.write_bytes(loras[1].read_bytes())
    save_lora(loras[0], alpha, format="kohya")
    specs = [f"{zeta}:0.9", f"{alpha}:-0.7"]
    out = bake.merge(base_file, [(zeta, 0.9), (alpha, -0.7)], tmp_path / "m.safetensors", fmt="single")
    assert_same_weights(models.load_base(str(out), device="cpu", dtype="fp32"),
                        api.load(str(base_file), device="cpu", dtype="fp32", loras=specs))
    assert [m["source"] for m in json.loads(tensors(out)[1][bake.META_MERGED])] == [str(zeta), str(alpha)]


def test_fp16_input_to_a_wider_dtype_rounds_once(base_file, loras, tmp_path):
    """An fp16 checkpoint written as fp32: the float32 sum W0 + ΔW, not one rounded to fp16 first (the in-memory
    patch of the fp16 file loaded in fp32)."""
    half = bake.merge(base_file, [(loras[1], 0.0)], tmp_path / "half.safetensors", fmt="single", dtype="fp16")
    pairs = [(loras[0], 0.8)]
    out = bake.merge(half, pairs, tmp_path / "wide.safetensors", fmt="single", dtype="fp32")
    assert_same_weights(models.load_base(str(out), device="cpu", dtype="fp32"), patched_in_memory(half, pairs))


def test_a_loaded_route_keeps_the_folder_dtype_the_te2_weight_and_the_metadata(base_folder, loras, tmp_path):
    """A folder written as one file (the model loaded, patched, saved): in the dtype the folder stores, with the
    merge in its metadata, as the streamed routes write it; SDXL's (unet, te1, te2) weights each applied."""
    half = models.save_diffusers(models.load_base(str(base_folder), device="cpu", dtype="fp16"), tmp_path / "half")
    out = bake.merge(half, [(loras[1], 0.6)], tmp_path / "half.safetensors", fmt="single")
    state, meta = tensors(out)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    assert json.loads(meta[bake.META_MERGED])[0]["unet_weight"] == 0.6

    xl = models.load_base("tiny-xl", device="cpu", dtype="fp32")
    g = torch.Generator().manual_seed(5)
    lora = Lora(format="test")
    for comp in ("text_encoder", "text_encoder_2", "unet"):
        path, m = next((p, m) for p, m in getattr(xl, comp).named_modules()
                       if isinstance(m, torch.nn.Linear) and ("q_proj" in p or "attn2.to_q" in p))
        lora.modules[comp][path] = Adapter("lora", {"down": torch.randn(2, m.in_features, generator=g),
                                                    "up": torch.randn(m.out_features, 2, generator=g)}, 2.0)
    weights = (1.0, 0.5, -0.25)
    out = bake.merge("tiny-xl", [(lora, weights)], tmp_path / "xl.safetensors", fmt="single")
    LoraSet.attach(xl).add("a", lora, {"unet": 1.0, "text_encoder": 0.5, "text_encoder_2": -0.25})
    assert_same_weights(models.load_base(str(out), device="cpu", dtype="fp32"), xl,
                        comps=("unet", "text_encoder", "text_encoder_2", "vae"))
