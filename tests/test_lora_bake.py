"""Baking LoRAs into a checkpoint: streamed single file, diffusers folder, and what a reload gives back."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune import models
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
    """The reference: load the base, add the LoRAs in list order with LoraSet."""
    base = models.load_base(str(spec), device="cpu", dtype=dtype)
    s = LoraSet.attach(base)
    for i, (src, w) in enumerate(pairs):
        s.add(f"{i:04d}", src, *((w,) if not isinstance(w, tuple) else w))
    return base


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

    got = models.load_base(str(out), device="cpu", dtype="fp32")
    for comp in ("unet", "text_encoder", "vae"):
        mine, ref = getattr(got, comp).state_dict(), getattr(want, comp).state_dict()
        for k in ref:
            assert torch.equal(mine[k], ref[k]), f"{comp}.{k}"


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
    got = models.load_base(str(out), device="cpu", dtype="fp32")
    for comp in ("unet", "text_encoder"):
        mine, ref = getattr(got, comp).state_dict(), getattr(want, comp).state_dict()
        for k in ref:
            assert torch.equal(mine[k], ref[k]), f"{comp}.{k}"
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
    with pytest.raises(SdtuneError, match=r"adapter weight \(1\.0, 2\.0, 3\.0\): give one number"):
        bake.merge(base_file, [(loras[1], (1.0, 2.0, 3.0))], tmp_path / "x.safetensors", fmt="single")
    assert list(tmp_path.iterdir()) == []


def test_truncated_checkpoint_fails_clearly_and_leaves_no_file(base_file, loras, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = base_file.read_bytes()
    cut.write_bytes(data[: len(data) - 4096])
    with pytest.raises(SdtuneError, match="truncated"):
        bake.merge(cut, [(loras[1], 1.0)], tmp_path / "out.safetensors", fmt="single")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.safetensors"]
