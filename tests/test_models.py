"""Base models: tokenizer, single-file and diffusers round trips, device/dtype choice, clear errors."""

import hashlib
import json
import pickle
import re
import shutil
import sys
import zipfile

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

from sdtune import families, ldm
from sdtune.families.build import build_parts
from sdtune.model_names import known_family
from sdtune.models import (
    Base,
    load_base,
    pick_device,
    pick_dtype,
    save_diffusers,
    save_single_file,
)
from sdtune.safeio import SdtuneError


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def base():
    return load_base("tiny-random", device="cpu")


@pytest.fixture(scope="module")
def shipped():
    """The built-in model: a file without sdtune's metadata is read with the family's (shipped) configs."""
    return load_base("tiny", device="cpu")


@pytest.fixture(scope="module")
def single_file(base, tmp_path_factory):
    return save_single_file(base, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def _outputs(b: Base) -> dict:
    """UNet noise prediction, text-encoder states and VAE decode for fixed inputs."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    ids = b.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = b.text_encoder(ids)[0]
        noise = b.unet(latents, 500, encoder_hidden_states=text).sample
        image = b.vae.decode(latents).sample
    return {"text": text, "noise": noise, "image": image}


def _assert_same_outputs(a: Base, b: Base):
    out_a, out_b = _outputs(a), _outputs(b)
    for name in out_a:
        assert torch.equal(out_a[name], out_b[name]), name


def test_tokenizer_is_sd_clip(base):
    assert base.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(base.tokenizer) == 49408


def test_tiny_random_is_deterministic(base):
    again = load_base("tiny-random", device="cpu")
    assert again.model_hash == base.model_hash and len(base.model_hash) == 10
    _assert_same_outputs(base, again)
    assert (base.source, base.family.name, base.single_file) == ("tiny-random", "tiny", None)
    assert load_base("tiny", device="cpu").family.name == "tiny"


def test_single_file_round_trip(base, single_file):
    with open(single_file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert any(k.startswith("model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1") for k in header)
    assert any(k.startswith("first_stage_model.encoder.down.0.block.0.conv1") for k in header)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.0") for k in header)
    loaded = load_base(str(single_file), device="cpu")
    assert (loaded.source, loaded.family.name, loaded.single_file) == ("single-file", "tiny", single_file)
    assert loaded.model_hash == hashlib.sha256(single_file.read_bytes()).hexdigest()[:10]
    assert loaded.vae.config.scaling_factor == base.vae.config.scaling_factor
    _assert_same_outputs(base, loaded)


def test_single_file_readable_by_diffusers(base, single_file, tmp_path):
    """diffusers' own single-file loader (offline, local config) reads the same weights from our file."""
    from diffusers import StableDiffusionPipeline

    config = save_diffusers(base, tmp_path / "config")
    pipe = StableDiffusionPipeline.from_single_file(str(single_file), config=str(config), local_files_only=True)
    for ours, theirs in ((base.unet, pipe.unet), (base.vae, pipe.vae), (base.text_encoder, pipe.text_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shape_detection_without_metadata(shipped, tmp_path):
    state = ldm.to_ldm_state_dict(shipped.unet, shipped.vae, shipped.text_encoder)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(plain))  # no sdtune metadata
    _assert_same_outputs(shipped, load_base(str(plain), device="cpu"))


def test_fp16_single_file(base, tmp_path):
    path = save_single_file(base, tmp_path / "half.safetensors", dtype="fp16")
    loaded = load_base(str(path), device="cpu", dtype="fp32")
    assert loaded.unet.conv_in.weight.dtype == torch.float32
    assert torch.allclose(loaded.unet.conv_in.weight, base.unet.conv_in.weight, atol=1e-3)


def test_ckpt_through_safe_loader(shipped, tmp_path):
    state = ldm.to_ldm_state_dict(shipped.unet, shipped.vae, shipped.text_encoder)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 10}, path)
    _assert_same_outputs(shipped, load_base(str(path), device="cpu"))


def test_ckpt_with_a_training_runs_numpy_step_and_lightning_callback_loads(shipped, tmp_path, monkeypatch):
    """CompVis/Stability training checkpoints keep numpy scalars and Lightning's ModelCheckpoint beside the
    weights, which A1111's restricted unpickler allows: read without running the file's code (or Lightning's)."""
    import types

    import numpy as np

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = torch.tensor(0.1)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    state = ldm.to_ldm_state_dict(shipped.unet, shipped.vae, shipped.text_encoder)
    path = tmp_path / "sd-v1-style.ckpt"
    torch.save({"state_dict": state, "global_step": np.int64(470000), "epoch": np.int64(5),
                "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)  # as on a machine without Lightning
    _assert_same_outputs(shipped, load_base(str(path), device="cpu"))
    # the allowance is for those objects alone: one more object of any other kind is refused as ever
    torch.save({"state_dict": state, "global_step": np.int64(1), "payload": Payload()}, path)
    with pytest.raises(SdtuneError, match="refuses to unpickle"):
        load_base(str(path), device="cpu")


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_ckpt_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(SdtuneError, match="refuses to unpickle"):
        load_base(str(path), device="cpu")
    assert "pwned" not in capsys.readouterr().out


def test_diffusers_folder_round_trip(base, tmp_path):
    folder = save_diffusers(base, tmp_path / "model")
    loaded = load_base(str(folder), device="cpu")
    assert (loaded.source, loaded.family.name) == ("diffusers", "tiny")
    assert type(loaded.scheduler) is type(base.scheduler)
    _assert_same_outputs(base, loaded)
    save_diffusers(loaded, folder)  # replacing an existing model folder works
    assert load_base(str(folder), device="cpu").model_hash == loaded.model_hash
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folders left behind


def test_a_folder_loads_in_the_dtype_asked_for_with_the_weights_a_cast_gives(base, tmp_path):
    # read straight into the dtype (no fp32 copy on the way, which doubled an SDXL folder's memory): the same
    # values as casting the fp32 model, and the same dtype for every component
    folder = save_diffusers(base, tmp_path / "model")
    for dtype in (torch.float16, torch.bfloat16):
        loaded = load_base(str(folder), device="cpu", dtype={torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype])
        for name in ("unet", "vae", "text_encoder"):
            theirs, mine = getattr(base, name).state_dict(), getattr(loaded, name).state_dict()
            assert theirs.keys() == mine.keys()
            for key, value in mine.items():
                assert value.dtype == dtype, (name, key)
                assert torch.equal(value, theirs[key].to(dtype)), (name, key)


def test_pipeline_and_to(base):
    pipe = base.pipeline()
    assert pipe.safety_checker is None and pipe.unet is base.unet
    result = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(1)).images
    again = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(1)).images
    assert result.shape == (1, 64, 64, 3) and (result == again).all()
    half = load_base("tiny-random", device="cpu").to("cpu", "bf16")
    assert half.dtype == torch.bfloat16 and half.unet.conv_in.weight.dtype == torch.bfloat16


def test_sd15_configs_are_the_real_architecture():
    configs = families.SD1.component_configs()
    with init_empty_weights():
        parts = build_parts(families.SD1, configs)
        unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert (count(unet), count(vae), count(text_encoder)) == (859_520_964, 83_653_863, 123_060_480)
    assert unet.config.cross_attention_dim == 768 and text_encoder.config.hidden_size == 768


def test_device_and_dtype_choice():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type in ("cuda", "mps", "cpu")
    assert pick_dtype("cpu") == torch.float32 and pick_dtype("cuda") == torch.float16
    assert pick_dtype("cpu", "bf16") == torch.bfloat16 and pick_dtype("cpu", "fp16") == torch.float16
    with pytest.raises(SdtuneError, match="unknown dtype"):
        pick_dtype("cpu", "fp8")
    with pytest.raises(SdtuneError, match="device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SdtuneError, match="CUDA is not available"):
            pick_device("cuda")


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _fake_checkpoint(path, cross_width, conv_width=320, extra=None):
    prefix = ldm.UNET_PREFIX
    state = {prefix + "input_blocks.0.0.weight": torch.zeros(conv_width, 4, 3, 3),
             prefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(conv_width, cross_width)}
    save_file(state | (extra or {}), str(path))
    return str(path)


@pytest.mark.parametrize("make, words", [
    (lambda p: str(p / "missing.safetensors"), "no such file"),
    (lambda p: str(p / "missing_folder") + "/", "no such file"),
    (lambda p: _write(p / "junk.safetensors", b"\x00garbage" * 100), r"junk.safetensors: neither a readable "
     r"safetensors file \(its header would be .* bytes, the file has 800\) nor a torch file; re-download"),
    (lambda p: _write(p / "cut.safetensors", b"\x10\x00\x00"), r"cut.safetensors: neither a readable safetensors "
     r"file \(shorter than a safetensors header\) nor a torch file"),
    (lambda p: _fake_checkpoint(p / "xl.safetensors", 2048, extra={"conditioner.embedders.0.x": torch.zeros(1)}),
     "SDXL"),
    (lambda p: _fake_checkpoint(p / "xl_bare.safetensors", 2048), "SDXL"),
    (lambda p: _fake_checkpoint(p / "sd2.safetensors", 1024), "SD 2.x"),
    (lambda p: _fake_checkpoint(p / "inpaint.safetensors", 768, extra={
        ldm.UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}), "inpainting"),
    (lambda p: _fake_checkpoint(p / "incomplete.safetensors", 768), "without the text encoder|weights do not fit|unexpected weight|no vae"),
    (lambda p: save_file({"lora_unet_x.lora_down.weight": torch.zeros(1)}, str(p / "l.safetensors"))
     or str(p / "l.safetensors"), "LoRA"),
    (lambda p: (p / "folder").mkdir() or str(p / "folder"), "no model_index.json"),
])
def test_bad_specs_give_one_clear_line(tmp_path, make, words):
    spec = make(tmp_path)
    with pytest.raises(SdtuneError, match=words) as caught:
        load_base(spec, device="cpu")
    assert "\n" not in str(caught.value)


def test_truncated_safetensors(single_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single_file.read_bytes()[: single_file.stat().st_size // 2])
    with pytest.raises(SdtuneError, match="not a readable safetensors file") as caught:
        load_base(str(cut), device="cpu")
    assert str(cut) in str(caught.value)


def test_corrupt_diffusers_folder(base, tmp_path):
    folder = save_diffusers(base, tmp_path / "model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SdtuneError, match="cannot load the diffusers model"):
        load_base(str(folder), device="cpu")


@pytest.mark.parametrize("key, value, says", [
    ("in_channels", 9, "the UNet takes 9 input channels (an inpainting or instruct-pix2pix model)"),
    ("cross_attention_dim", 1280, "an SDXL refiner (cross-attention width 1280), which only refines images"),
])
def test_a_folder_of_a_model_sdtune_cannot_sample_is_refused_by_name(base, tmp_path, key, value, says):
    """As a single file is (an inpainting folder loaded, then its first sampling step failed with a traceback)."""
    folder = save_diffusers(base, tmp_path / "model")
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), key: value}))
    with pytest.raises(SdtuneError, match=rf"^{folder}: {re.escape(says)}"):
        load_base(str(folder), device="cpu")


@pytest.mark.parametrize("key, says", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "a LoRA/adapter file, not a base model; give "
                                                                      "it with --lora"),
    ("unet.down_blocks.0.attentions.0.proj_in.lora.down.weight", "a LoRA/adapter file"),  # diffusers' old layout
    ("emb_params", "a textual-inversion embedding, not a base model; give it with --embedding"),
    ("clip_g", "a textual-inversion embedding"),
    ("encoder.down.0.block.0.conv1.weight", "a VAE, not a whole model; give it with --vae"),
    ("control_model.input_blocks.0.0.weight", "a ControlNet, which sdtune does not use"),
])
def test_a_file_of_another_kind_as_the_model_says_what_it_is(tmp_path, key, says):
    path = tmp_path / "given.safetensors"
    save_file({key: torch.zeros(2, 2)}, str(path))
    with pytest.raises(SdtuneError, match=rf"^{path}: this is {says}"):
        load_base(str(path), device="cpu")


def test_a_folder_of_fp16_variant_weights_loads_and_a_missing_component_is_named(base, tmp_path, capfd):
    """A hub download with variant="fp16" holds only NAME.fp16.safetensors files (refused before, with diffusers'
    log lines); a folder without one component's folder names it (a hub-id error was shown)."""
    folder = save_diffusers(base, tmp_path / "model")
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(f"{weights.stem}.fp16.safetensors"))
    loaded = load_base(str(folder), device="cpu")
    assert torch.equal(loaded.unet.conv_in.weight, base.unet.conv_in.weight)
    assert torch.equal(loaded.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)
    assert capfd.readouterr().err == ""
    shutil.rmtree(folder / "vae")
    with pytest.raises(SdtuneError, match=rf"^{folder}: no vae/config.json, so the vae is missing; re-download"):
        load_base(str(folder), device="cpu")


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SdtuneError, match="hub is unreachable.*local") as caught:
        load_base("someone/some-sd15-model-that-is-not-cached", device="cpu")
    assert "\n" not in str(caught.value)


def test_hub_connection_error_is_quick_and_clear(monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(SdtuneError, match="hub is unreachable; download the model and pass its local"):
        load_base("someone/some-model", device="cpu")


def test_raw_pickle_is_not_executed(tmp_path, capsys):
    """A legacy (non-zip) pickle with a payload is refused the same way."""
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=2))
    assert not zipfile.is_zipfile(path)
    with pytest.raises(SdtuneError, match="refuses to unpickle"):
        load_base(str(path), device="cpu")
    assert "pwned" not in capsys.readouterr().out


def test_the_family_is_known_before_loading_where_the_files_tell_it(base, shipped, single_file, tmp_path):
    # the web UI's Train form shows the model's preset from this, before a model file is loaded
    state = ldm.to_ldm_state_dict(shipped.unet, shipped.vae, shipped.text_encoder)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(plain))  # no sdtune metadata: by the widths
    sd2 = tmp_path / "sd2-header.safetensors"  # only the header is read: one SD 2.x-wide cross-attention key
    save_file({ldm.UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(2, 1024)},
              str(sd2))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, ckpt)
    folder = save_diffusers(base, tmp_path / "model")
    (tmp_path / "notes.safetensors").write_text("not weights")
    cases = {"tiny-xl": "tiny-xl", "sd2-random": "sd2", str(single_file): "tiny", str(plain): "tiny",
             str(folder): "tiny", str(sd2): "sd2", str(ckpt): None, str(tmp_path / "notes.safetensors"): None,
             str(tmp_path / "missing.safetensors"): None, "someone/model": None}
    assert {spec: getattr(known_family(spec), "name", None) for spec in cases} == cases
    assert load_base(str(plain), device="cpu").family is known_family(str(plain))
