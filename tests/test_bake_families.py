"""Streamed merges of SDXL and SD 2.x: single file -> single file (the family's own layout), single file ->
diffusers folder, and SDXL folder -> folder, each equal bit for bit to the in-memory patch (``load_base`` +
``LoraSet``). A LoRA on an OpenCLIP q/k/v projection changes a block of rows of the fused ``in_proj_weight``;
one on SDXL's ``text_projection`` changes a tensor stored transposed."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file
from test_lora_bake import assert_same_weights, files_of, patched_in_memory, tensors
from test_single_file_families import _small_sd2

from sdtune import checkpoints, families, ldm, models
from sdtune.cli import main
from sdtune.generate import make_scheduler
from sdtune.lora import bake, inspect
from sdtune.lora.formats import sampling_metadata
from sdtune.lora.neutral import Adapter, Lora
from sdtune.safeio import SdtuneError

ALL = ("unet", "vae", "text_encoder", "text_encoder_2")
EXTRA = {"model_ema.decay": torch.tensor(0.9999), "denoiser.sigmas": torch.linspace(0.03, 14.6, 10)}
TE2 = families.SDXL.text_encoders[1].single_file_prefix + "transformer.resblocks."
SD2_TE = families.SD2.text_encoders[0].single_file_prefix


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))


def _layers(module, suffixes):
    """(path without text_model., module) of the layers whose path ends with one of ``suffixes``."""
    return [(p.removeprefix("text_model."), m) for p, m in module.named_modules() if p.endswith(suffixes)]


def _factors(module, rank, g) -> dict:
    w = module.weight
    return {"down": torch.randn(rank, *w.shape[1:], generator=g) * 0.1,
            "up": torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=g) * 0.1}


def kohya_lora(base, path, seed: int, rank: int = 4):
    """A kohya file on UNet attention, feed-forward and a 3x3 conv, on both text encoders' attention and MLP,
    and on the q/k/v projections the OpenCLIP encoder fuses (all three in layer 0, v alone in layer 1)."""
    g = torch.Generator().manual_seed(seed)
    targets = [("lora_unet_", p, m) for p, m in _layers(base.unet, ("attn1.to_q", "attn2.to_k", "ff.net.2"))]
    targets.append(("lora_unet_", "down_blocks.1.resnets.0.conv1", base.unet.get_submodule("down_blocks.1.resnets.0.conv1")))
    for te in base.family.text_encoders:
        suffixes = ("0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj", "1.self_attn.v_proj",
                    "0.self_attn.out_proj", "1.mlp.fc1")
        targets += [(te.kohya_prefix + "text_model.", p, m) for p, m in _layers(getattr(base, te.component), suffixes)]
    state = {}
    for prefix, p, m in targets:
        name = (prefix + p).replace(".", "_")
        factors = _factors(m, rank, g)
        state |= {f"{name}.lora_down.weight": factors["down"], f"{name}.lora_up.weight": factors["up"],
                  f"{name}.alpha": torch.tensor(2.0)}
    save_file(state, str(path), metadata={"ss_base_model_version": base.family.base_model_version})
    return path


def neutral_lora(base, seed: int) -> Lora:
    """A LoRA object on the last text encoder's layer-1 q projection (the fused tensor's first rows), on SDXL's
    text_projection (stored transposed) and on a UNet layer the kohya file also changes."""
    g = torch.Generator().manual_seed(seed)
    lora = Lora(format="test")
    te = base.family.text_encoders[-1]
    module = getattr(base, te.component)
    paths = ["encoder.layers.1.self_attn.q_proj"] + (["text_projection"] if hasattr(module, "text_projection") else [])
    for path in paths:
        inner = module.text_model if hasattr(module, "text_model") and path != "text_projection" else module
        layer = inner.get_submodule(path)
        lora.modules[te.component][path] = Adapter("lora", _factors(layer, 8, g), 4.0)
    unet_path = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    lora.modules["unet"][unet_path] = Adapter("lora", _factors(base.unet.get_submodule(unet_path), 8, g), 4.0)
    return lora


def _write_model(base, path, extra: dict) -> object:
    models.save_single_file(base, path)
    state, meta = tensors(path)
    save_file(state | extra, str(path), metadata={**meta, "modelspec.title": base.family.name})
    return path


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(SDXL single file in fp16 with EMA/denoiser keys, [(kohya LoRA, weights), (Lora object, weight)])."""
    d = tmp_path_factory.mktemp("xl")
    base = models.load_base("sdxl-small-random", device="cpu", dtype="fp16")
    path = _write_model(base, d / "xl.safetensors", {k: v.half() for k, v in EXTRA.items()})
    return path, [(kohya_lora(base, d / "xl_kohya.safetensors", 1), (0.8, -0.6)), (neutral_lora(base, 2), 1.3)]


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """(SD 2.x single file in fp32 with what original files carry beyond the model: OpenCLIP's last block
    (here block 2 of a 2-layer encoder), its projection and temperature; LoRA pairs as for sdxl)."""
    d = tmp_path_factory.mktemp("sd2")
    base = _small_sd2()
    state = ldm.to_single_file(base.modules(), base.family)
    beyond = {k.replace(".resblocks.1.", ".resblocks.2."): v.clone() + 1 for k, v in state.items()
              if k.startswith(SD2_TE + "transformer.resblocks.1.")}
    beyond |= {SD2_TE + "text_projection": torch.randn(1024, 512), SD2_TE + "logit_scale": torch.tensor(4.6)}
    schedule = {"alphas_cumprod": torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)}
    path = _write_model(base, d / "sd2.safetensors", EXTRA | beyond | schedule)
    return path, [(kohya_lora(base, d / "sd2_kohya.safetensors", 3), (0.8, -0.6)), (neutral_lora(base, 4), 1.3)]


@pytest.fixture(params=["sdxl", "sd2"])
def model(request):
    return request.getfixturevalue(request.param)


def _dtype(path) -> str:
    conv_in = load_file(str(path))[ldm.UNET_PREFIX + "input_blocks.0.0.weight"]
    return {torch.float16: "fp16", torch.float32: "fp32"}[conv_in.dtype]


def streamed_and_reference(monkeypatch, source, pairs, out, fmt, dtype):
    """(the merge, with ``load_base`` forbidden: the streamed paths never load the model; the in-memory patch)."""
    want = patched_in_memory(source, pairs, dtype=dtype)
    monkeypatch.setattr(models, "load_base", lambda *a, **k: pytest.fail("the streaming path must not load the model"))
    out = bake.merge(source, pairs, out, fmt=fmt)
    monkeypatch.undo()
    return out, want


# ---------------------------------------------------------------- the plan

def test_plan_names_what_the_reader_reads(model):
    """Following ``single_file_plan`` gives the state dicts ``split_single_file`` gives, tensor for tensor."""
    path, _ = model
    base = models.load_base(str(path), device="cpu")
    state, _ = tensors(path)
    plan = ldm.single_file_plan(state, base.family, base.modules())
    followed = {name: {} for name in base.modules()}
    for key, targets in plan.items():
        for t in targets:
            value = state[key].chunk(3)[t.chunk] if t.chunk is not None else state[key]
            followed[t.component][t.name] = (value.T if t.transposed else value, t.squeeze)
    expected = ldm.split_single_file(state, base.family, base.modules())
    for name, part in expected.items():
        assert followed[name].keys() == part.keys(), name
        for k, want in part.items():
            value, squeeze = followed[name][k]
            assert squeeze == (value.dim() > want.dim()) and torch.equal(value.reshape(want.shape), want), (name, k)
    assert set(state) - set(plan) == set()  # every key known: EMA, schedules, SD 2.x's extra block mapped to []
    assert {k for k, v in plan.items() if not v} >= set(EXTRA)


def test_unknown_key_is_named(sdxl, tmp_path):
    path, pairs = sdxl
    state, meta = tensors(path)
    bad = tmp_path / "bad.safetensors"
    save_file(state | {TE2 + "0.attn.bogus_weight": torch.zeros(2)}, str(bad), metadata=meta)
    with pytest.raises(SdtuneError, match=r"bad.safetensors: unexpected weight .*bogus_weight: not a SDXL model"):
        bake.merge(bad, pairs[:1], tmp_path / "out" / "merged", fmt="diffusers")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- single file -> single file

def test_single_file_streams_the_in_memory_patch(model, tmp_path, monkeypatch):
    path, pairs = model
    out, want = streamed_and_reference(monkeypatch, path, pairs, tmp_path / "merged.safetensors", "single", _dtype(path))

    before, after = load_file(str(path)), load_file(str(out))
    reference = load_file(str(models.save_single_file(want, tmp_path / "reference.safetensors")))
    assert list(after) == list(before)  # the input's layout, every key kept, in file order
    for key, value in after.items():  # the model's tensors as the in-memory patch writes them, the rest as they were
        assert value.dtype == before[key].dtype and torch.equal(value, reference.get(key, before[key])), key
    assert set(before) - set(reference) >= set(EXTRA)
    te = want.family.text_encoders[-1]
    fused = f"{te.single_file_prefix}transformer.resblocks.1.attn.in_proj_weight"
    rows = before[fused].shape[0] // 3
    changed = [not torch.equal(after[fused][i * rows:(i + 1) * rows], before[fused][i * rows:(i + 1) * rows])
               for i in range(3)]
    assert changed == [True, False, True]  # q from the Lora object, v from the kohya file; k untouched
    meta = tensors(out)[1]
    assert meta["modelspec.title"] == want.family.name and meta[checkpoints.META_ARCH] == want.family.name
    assert [(m["te_weight"], m["te2_weight"]) for m in json.loads(meta[bake.META_MERGED])] == [(-0.6, -0.6), (1.3, 1.3)]
    assert_same_weights(models.load_base(str(out), device="cpu", dtype=_dtype(path)), want, tuple(want.modules()))


def test_sdxl_text_projection_is_patched_in_its_stored_orientation(sdxl, tmp_path):
    path, pairs = sdxl
    key = families.SDXL.text_encoders[1].single_file_prefix + "text_projection"
    out = bake.merge(path, pairs[1:], tmp_path / "merged.safetensors", fmt="single")
    want = patched_in_memory(path, pairs[1:], dtype="fp16")
    assert torch.equal(load_file(str(out))[key], want.text_encoder_2.text_projection.weight.T)
    assert not torch.equal(load_file(str(path))[key], load_file(str(out))[key])


def test_sd2_single_file_to_fp16(sd2, tmp_path):
    path, pairs = sd2
    out = bake.merge(path, pairs, tmp_path / "half.safetensors", fmt="single", dtype="fp16")
    want = patched_in_memory(path, pairs)  # fp32, cast once when written
    reference = load_file(str(models.save_single_file(want, tmp_path / "reference.safetensors", dtype="fp16")))
    after = load_file(str(out))
    assert all(torch.equal(after[k], v) for k, v in reference.items())
    assert after[SD2_TE + "logit_scale"].dtype == torch.float16
    # the sampling schedule beside the model keeps its dtype and values (A1111 keeps it fp32 in a halved model)
    assert after["alphas_cumprod"].dtype == after["denoiser.sigmas"].dtype == torch.float32
    assert torch.equal(after["alphas_cumprod"], load_file(str(path))["alphas_cumprod"])
    assert after["model_ema.decay"].dtype == torch.float16  # the rest beside the model is cast as asked


# ---------------------------------------------------------------- single file -> folder

def test_single_file_to_folder_streams_the_in_memory_patch(model, tmp_path, monkeypatch):
    path, pairs = model
    out, want = streamed_and_reference(monkeypatch, path, pairs, tmp_path / "merged", "diffusers", _dtype(path))

    reference = models.save_diffusers(want, tmp_path / "reference")
    mine, theirs = files_of(out), files_of(reference)
    assert mine.keys() == theirs.keys()
    for name in theirs:  # configs, tokenizers, scheduler as save_diffusers writes them; weights by value
        if name.endswith(".safetensors"):
            a, b = tensors(mine[name])[0], tensors(theirs[name])[0]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), name
        else:
            assert mine[name].read_bytes() == theirs[name].read_bytes(), name
    assert_same_weights(models.load_base(str(out), device="cpu", dtype=_dtype(path)), want, tuple(want.modules()))


def test_sdxl_folder_loads_in_diffusers(sdxl, tmp_path):
    path, pairs = sdxl
    out = bake.merge(path, pairs, tmp_path / "merged", fmt="diffusers")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out), torch_dtype=torch.float16)
    want = patched_in_memory(path, pairs, dtype="fp16")
    for name, module in want.modules().items():
        mine, ref = getattr(pipe, name).state_dict(), module.state_dict()
        assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref), name


def test_sd2_folder_loads_in_diffusers(sd2, tmp_path):
    path, pairs = sd2
    out = bake.merge(path, pairs, tmp_path / "merged", fmt="diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    want = patched_in_memory(path, pairs)
    for name, module in want.modules().items():
        mine, ref = getattr(pipe, name).state_dict(), module.state_dict()
        assert all(torch.equal(mine[k], ref[k]) for k in ref), name


def test_sdxl_file_without_text_encoder_2_is_refused(sdxl, tmp_path):
    path, pairs = sdxl
    state, meta = tensors(path)
    cut = tmp_path / "no_te2.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("conditioner.embedders.1.")}, str(cut), metadata=meta)
    with pytest.raises(SdtuneError, match=r"no_te2.safetensors: has no text_encoder_2 weights "
                                          r"\(conditioner.embedders.1.model.\*\); pass a full checkpoint of SDXL"):
        bake.merge(cut, pairs[:1], tmp_path / "out", fmt="diffusers")
    assert not (tmp_path / "out").exists()


def test_sd1_lora_on_sdxl_is_refused(sdxl, tmp_path):
    path, _ = sdxl
    wrong = Lora()
    wrong.modules["unet"]["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] = Adapter(
        "lora", {"down": torch.zeros(4, 768), "up": torch.zeros(64, 4)})
    with pytest.raises(SdtuneError, match=r"this LoRA is for SD 1.x; the model is SDXL"):
        bake.merge(path, [(wrong, 1.0)], tmp_path / "out" / "x.safetensors", fmt="single")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- SDXL folder -> folder

@pytest.fixture(scope="module")
def sdxl_folder(sdxl, tmp_path_factory):
    """The SDXL model as a diffusers folder, text_encoder_2 in 3 shards named the hub's way (text_model.*)."""
    path, _ = sdxl
    out = models.save_diffusers(models.load_base(str(path), device="cpu", dtype="fp16"),
                                tmp_path_factory.mktemp("xl_folder") / "xl")
    state, meta = tensors(out / "text_encoder_2" / "model.safetensors")
    (out / "text_encoder_2" / "model.safetensors").unlink()
    keys, weight_map = sorted(state), {}
    for n in range(3):
        shard = f"model-0000{n + 1}-of-00003.safetensors"
        part = {k: state[k] for k in keys[n::3]}
        save_file(part, str(out / "text_encoder_2" / shard), metadata=meta)
        weight_map |= dict.fromkeys(part, shard)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())}, "weight_map": weight_map}
    (out / "text_encoder_2" / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def test_sdxl_folder_to_folder_streams_the_in_memory_patch(sdxl, sdxl_folder, tmp_path, monkeypatch):
    _, pairs = sdxl
    out, want = streamed_and_reference(monkeypatch, sdxl_folder, pairs, tmp_path / "merged", "diffusers", "fp16")

    before, after = files_of(sdxl_folder), files_of(out)
    assert before.keys() == after.keys()
    rewritten = {n for n in before if n.endswith(".safetensors") and not n.startswith("vae/")}
    assert {n for n in before if n.startswith("text_encoder_2/model-")} <= rewritten
    for name in set(before) - rewritten:
        assert after[name].read_bytes() == before[name].read_bytes(), name
    changed = set()
    for name in rewritten:
        old, new = tensors(before[name])[0], tensors(after[name])[0]
        assert old.keys() == new.keys()
        changed |= {f"{name.split('/')[0]}:{k}" for k in old if not torch.equal(old[k], new[k])}
    assert {"text_encoder_2:text_model.encoder.layers.1.self_attn.q_proj.weight",
            "text_encoder_2:text_projection.weight",
            "text_encoder:encoder.layers.0.self_attn.k_proj.weight"} <= changed
    assert_same_weights(models.load_base(str(out), device="cpu", dtype="fp16"), want, ALL)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out), torch_dtype=torch.float16)
    for name in ("unet", "text_encoder_2"):
        mine, ref = getattr(pipe, name).state_dict(), getattr(want, name).state_dict()
        assert all(torch.equal(mine[k], ref[k]) for k in ref), name


def test_sdxl_folder_missing_shard_fails_clearly(sdxl, sdxl_folder, tmp_path):
    _, pairs = sdxl
    broken = tmp_path / "broken"
    shutil.copytree(sdxl_folder, broken)
    (broken / "text_encoder_2" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(SdtuneError, match=r"model-00002-of-00003.safetensors: a shard listed in "
                                          r"model.safetensors.index.json is missing; re-download the model"):
        bake.merge(broken, pairs, tmp_path / "out" / "merged")
    assert not (tmp_path / "out").exists()


def test_sd2_folder_to_folder_streams_the_in_memory_patch(sd2, tmp_path, monkeypatch):
    path, pairs = sd2
    folder = models.save_diffusers(models.load_base(str(path), device="cpu", dtype="fp32"), tmp_path / "sd2")
    out, want = streamed_and_reference(monkeypatch, folder, pairs, tmp_path / "merged", "diffusers", "fp32")
    assert_same_weights(models.load_base(str(out), device="cpu", dtype="fp32"), want, tuple(want.modules()))
    assert not (out / "text_encoder_2").exists()


def test_v_prediction_flags_are_read_kept_by_a_bake_and_written(sdxl, tmp_path):
    """A v-prediction SDXL fine-tune with zero terminal SNR (NoobAI-XL V-Pred style) says so only by its empty
    ``v_pred``/``ztsnr`` entries, as ComfyUI and A1111 read them: sdtune samples and trains it as such, a baked
    file keeps the flags, a baked folder's scheduler says them, and a file sdtune writes carries them."""
    path, pairs = sdxl
    state, meta = tensors(path)
    configs = json.loads(meta[checkpoints.META_CONFIGS])
    del configs["scheduler"]  # as a file from elsewhere: the flags are all it has
    marked = tmp_path / "vpred.safetensors"
    save_file(state | {"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, str(marked),
              metadata={**meta, checkpoints.META_CONFIGS: json.dumps(configs)})
    flags = lambda config: (config["prediction_type"], config["rescale_betas_zero_snr"], config["timestep_spacing"])  # noqa: E731
    want = ("v_prediction", True, "trailing")
    loaded = models.load_base(str(marked), device="cpu", dtype="fp16")
    assert flags(loaded.scheduler.config) == want
    # a sampler whose diffusers class has no zero-terminal-SNR schedule would draw on the ordinary one: refused
    with pytest.raises(SdtuneError, match=r"^--scheduler heun: this is a zero-terminal-SNR model, whose noise "
                                          r"schedule diffusers' HeunDiscreteScheduler does not build; use one of ddim"):
        make_scheduler("heun", loaded.scheduler)
    assert make_scheduler("euler", loaded.scheduler).alphas_cumprod[-1] < 1e-6
    assert sampling_metadata(loaded.family, loaded.scheduler.config) == {
        "ss_v_parameterization": "True", "ss_zero_terminal_snr": "True"}  # SDXL keeps its own version name
    assert models.load_base(str(path), device="cpu", dtype="fp16").scheduler.config.prediction_type == "epsilon"

    single = bake.merge(marked, pairs, tmp_path / "merged.safetensors", fmt="single")
    assert {"v_pred", "ztsnr"} <= tensors(single)[0].keys()
    assert flags(models.load_base(str(single), device="cpu", dtype="fp16").scheduler.config) == want
    folder = bake.merge(marked, pairs, tmp_path / "merged", fmt="diffusers")
    assert flags(json.loads((folder / "scheduler" / "scheduler_config.json").read_text())) == want
    written = models.save_single_file(models.load_base(str(folder), device="cpu", dtype="fp16"),
                                      tmp_path / "written.safetensors")
    assert {"v_pred", "ztsnr"} <= tensors(written)[0].keys()
    assert {"v_pred", "ztsnr"}.isdisjoint(tensors(models.save_single_file(models.load_base(str(path), device="cpu"),
                                                                          tmp_path / "eps.safetensors"))[0])


def test_modelspec_metadata_names_the_prediction_and_edm_files_are_refused(tmp_path):
    sampling = checkpoints.file_sampling
    assert sampling({"modelspec.prediction_type": "v"}) == {"prediction_type": "v_prediction"}
    assert sampling({"modelspec.architecture": "stable-diffusion-v2-512"}) == {"prediction_type": "epsilon"}
    assert sampling({"modelspec.architecture": "stable-diffusion-v2-768-v"}) == {"prediction_type": "v_prediction"}
    assert sampling({"modelspec.architecture": "stable-diffusion-xl-v1-base"}) == {}
    assert sampling({}, keys={"v_pred"}) == {"prediction_type": "v_prediction"}
    base = checkpoints.file_configs(families.SD2, {"modelspec.architecture": "stable-diffusion-v2-512"}, tmp_path)
    assert base["scheduler"]["prediction_type"] == "epsilon"
    assert base["unet"]["sample_size"] == 64  # the 512-px base model: generation and training default to 512
    v = checkpoints.file_configs(families.SD2, {}, tmp_path)
    assert (v["scheduler"]["prediction_type"], v["unet"]["sample_size"]) == ("v_prediction", 96)
    with pytest.raises(SdtuneError, match=r"x.safetensors: an EDM model \(Playground v2.5 style: edm_mean\)"):
        checkpoints.file_configs(families.SDXL, {}, tmp_path / "x.safetensors", keys={"edm_mean", "edm_std"})


def test_sd2_files_that_do_not_say_are_told_apart_by_a_weight(sd2, tmp_path):
    """SD 2.x's 768-v and 512-px base models share one architecture; a file with neither a marker nor ModelSpec
    metadata is read as ComfyUI reads it: v-prediction where the last output block's first norm1 bias spreads
    wider than 0.09 (std), noise prediction otherwise. What the file says wins over the weight."""
    probe = families.SD2.prediction_probe
    spread = lambda std: torch.randn(32, generator=torch.Generator().manual_seed(0)) * std  # noqa: E731
    sampling = checkpoints.file_sampling
    assert sampling({}, probe=spread(0.3)) == {"prediction_type": "v_prediction"}
    assert sampling({}, probe=spread(0.02)) == {"prediction_type": "epsilon"}
    assert sampling({"modelspec.prediction_type": "epsilon"}, probe=spread(0.3)) == {"prediction_type": "epsilon"}
    assert sampling({}, keys={"v_pred"}, probe=spread(0.02)) == {"prediction_type": "v_prediction"}
    assert not families.SD1.prediction_probe and not families.SDXL.prediction_probe  # their files say, or are eps

    def checkpoint(name, bias=None, metadata=None):  # a header's worth of an SD 2.x file
        state = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1024)}
        if bias is not None:
            state[probe] = bias.half()
        save_file(state, str(tmp_path / name), metadata=metadata)
        return checkpoints.describe_checkpoint(tmp_path / name)

    assert checkpoint("v.safetensors", spread(0.3))["prediction"] == "v_prediction"
    base = checkpoint("base.safetensors", spread(0.02))
    assert (base["family"], base["prediction"], base["prediction_from"]) == ("sd2", "epsilon", "weights")
    assert "(the file does not say: read from its weights, as ComfyUI reads it; a .yaml config" in inspect.render(
        base | {"hashes": {"autov2": "0", "sha256": "0", "autov1": "0"}})
    said = checkpoint("said.safetensors", spread(0.02), {"modelspec.prediction_type": "v"})
    assert (said["prediction"], said["prediction_from"]) == ("v_prediction", "file")
    none = checkpoint("none.safetensors")  # no weight to read: the family's default
    assert (none["prediction"], none["prediction_from"]) == ("v_prediction", "family")
    torch.save({"state_dict": {probe: spread(0.02), "model.diffusion_model.x.attn2.to_k.weight": torch.zeros(8, 1024)}},
               tmp_path / "base.ckpt")
    assert checkpoints.describe_checkpoint(tmp_path / "base.ckpt")["prediction"] == "epsilon"
    assert checkpoints.file_configs(families.SD2, {}, tmp_path, probe=spread(0.02))["scheduler"]["prediction_type"] == "epsilon"

    path, pairs = sd2  # a whole file from elsewhere: no v_pred entry, no scheduler config; loaded and baked
    state, meta = tensors(path)
    configs = json.loads(meta[checkpoints.META_CONFIGS])
    del configs["scheduler"]
    for std, want in ((0.02, "epsilon"), (0.3, "v_prediction")):
        bare = tmp_path / f"bare{std}.safetensors"
        save_file({k: v for k, v in state.items() if k != "v_pred"} | {probe: spread(std)}, str(bare),
                  metadata={**meta, checkpoints.META_CONFIGS: json.dumps(configs)})
        assert models.load_base(str(bare), device="cpu").scheduler.config.prediction_type == want
        folder = bake.merge(bare, pairs, tmp_path / f"merged{std}", fmt="diffusers")
        assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == want


def test_an_a1111_config_beside_a_checkpoint_settles_its_prediction(sd2, tmp_path, capsys):
    """``model.yaml`` beside ``model.safetensors`` is the config A1111 reads (and ComfyUI's "load checkpoint with
    config"): its LDM ``parameterization`` (none: eps) or SGM denoiser scaling wins over what sdtune reads from the
    file (here the weight's spread), in loading, inspect and a merge, which writes the config beside its output."""
    probe = families.SD2.prediction_probe
    path, pairs = sd2
    state, meta = tensors(path)
    configs = json.loads(meta[checkpoints.META_CONFIGS])
    del configs["scheduler"]
    metadata = {**meta, checkpoints.META_CONFIGS: json.dumps(configs)}
    spread = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 0.3  # the weights say v-prediction
    bare = tmp_path / "bare.safetensors"
    save_file({k: v for k, v in state.items() if k != "v_pred"} | {probe: spread}, str(bare), metadata=metadata)
    assert models.load_base(str(bare), device="cpu").scheduler.config.prediction_type == "v_prediction"

    ldm_config = "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    linear_start: 0.00085\n"
    (tmp_path / "bare.yaml").write_text(ldm_config)  # v2-inference.yaml: no parameterization, so eps
    assert models.load_base(str(bare), device="cpu").scheduler.config.prediction_type == "epsilon"
    described = checkpoints.describe_checkpoint(bare)
    assert (described["prediction"], described["prediction_from"]) == ("epsilon", "config")
    assert main(["inspect", str(bare)]) == 0
    assert "epsilon (from bare.yaml beside it, as A1111 reads it)" in capsys.readouterr().out
    merged = bake.merge(bare, pairs, tmp_path / "merged.safetensors", fmt="single")
    assert (tmp_path / "merged.yaml").read_text() == ldm_config
    assert models.load_base(str(merged), device="cpu").scheduler.config.prediction_type == "epsilon"
    folder = bake.merge(bare, pairs, tmp_path / "folder", fmt="diffusers")
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"

    (tmp_path / "bare.yaml").write_text(ldm_config + "    parameterization: v\n")  # v2-inference-v.yaml
    assert checkpoints.file_configs(families.SD2, {}, bare, probe=spread * 0)["scheduler"]["prediction_type"] == \
        "v_prediction"
    sgm = "model:\n  target: sgm.models.diffusion.DiffusionEngine\n  params:\n    denoiser_config:\n      params:\n" \
          "        scaling_config:\n          target: sgm.modules.diffusionmodules.denoiser_scaling.{}\n"
    for scaling, want in (("VScaling", "v_prediction"), ("EpsScaling", "epsilon")):
        (tmp_path / "bare.yaml").write_text(sgm.format(scaling))
        assert checkpoints.file_configs(families.SD2, {}, bare)["scheduler"]["prediction_type"] == want
    for text, says in (("model: [unclosed\n",
                        r"bare.yaml: not a model config A1111 reads \(expected ',' or ']'.* at line 2\)"),
                       ("notes: mine\n", r"no model.params entry\); fix it, or rename it"),
                       (ldm_config + "    parameterization: x0\n", "parameterization 'x0' is not one sdtune samples")):
        (tmp_path / "bare.yaml").write_text(text)
        with pytest.raises(SdtuneError, match=says):
            models.load_base(str(bare), device="cpu")
        assert main(["inspect", str(bare)]) == 2
        assert capsys.readouterr().err.count("bare.yaml") == 1


def full_and_norm_lora(base, seed: int) -> Lora:
    """LyCORIS full differences with bias changes and norm-layer adapters: on the last text encoder's layer-1 k
    projection (rows of OpenCLIP's fused ``in_proj_weight`` and ``in_proj_bias``) and a layer norm, on a UNet conv
    and a GroupNorm."""
    g = torch.Generator().manual_seed(seed)
    te = base.family.text_encoders[-1]
    module = getattr(base, te.component)
    inner = module.text_model if hasattr(module, "text_model") else module
    lora = Lora(format="test")
    for comp, root, diff, norm in ((te.component, inner, "encoder.layers.1.self_attn.k_proj", "encoder.layers.0.layer_norm1"),
                                   ("unet", base.unet, "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.norm1")):
        w, b = root.get_submodule(diff).weight, root.get_submodule(diff).bias
        lora.modules[comp][diff] = Adapter("diff", {"diff": torch.randn(w.shape, generator=g) * 0.1,
                                                    "bias": torch.randn(b.shape, generator=g) * 0.1})
        n = root.get_submodule(norm).weight.shape
        lora.modules[comp][norm] = Adapter("norm", {"weight": torch.randn(n, generator=g) * 0.1,
                                                    "bias": torch.randn(n, generator=g) * 0.1})
    return lora


def test_bias_and_norm_changes_stream_as_the_in_memory_patch(model, tmp_path, monkeypatch):
    """A bias change lands in the stored bias (a block of rows of a fused one), to a single file and to a folder,
    as ``LoraSet`` patches the loaded model."""
    path, _ = model
    base = models.load_base(str(path), device="cpu")
    pairs = [(full_and_norm_lora(base, 3), 0.6)]
    te = base.family.text_encoders[-1]
    fused = f"{te.single_file_prefix}transformer.resblocks.1.attn.in_proj_bias"
    for fmt, out in (("single", tmp_path / "merged.safetensors"), ("diffusers", tmp_path / "merged")):
        out, want = streamed_and_reference(monkeypatch, path, pairs, out, fmt, _dtype(path))
        assert_same_weights(models.load_base(str(out), device="cpu", dtype=_dtype(path)), want, tuple(want.modules()))
    before, after = load_file(str(path)), load_file(str(tmp_path / "merged.safetensors"))
    rows = before[fused].shape[0] // 3
    changed = [not torch.equal(after[fused][i * rows:(i + 1) * rows], before[fused][i * rows:(i + 1) * rows])
               for i in range(3)]
    assert changed == [False, True, False]  # k's bias only
