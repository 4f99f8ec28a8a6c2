"""Single-file checkpoints of SD 2.x (LDM layout, OpenCLIP text encoder) and SDXL (SGM layout, two encoders).

Small models of the real structure (``sdxl-small-random`` and a small SD 2.x built here) go through sdtune's
writer and reader bit for bit, and through diffusers' ``from_single_file`` as an independent reader; the real
sizes are checked by name (meta tensors) against diffusers' converters and real SDXL key names.
"""

import hashlib
import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune import checkpoints, families, ldm, model_names, models
from sdtune.cli import main
from sdtune.lora import inspect
from sdtune.safeio import SdtuneError, load_state

PIPELINES = {"sdxl": StableDiffusionXLPipeline, "sd2": StableDiffusionPipeline}


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))


def small_sd2_configs() -> dict:
    """SD 2.x's shipped configs at small widths: the same blocks, OpenCLIP widths (1024) and names."""
    configs = families.SD2.component_configs()
    configs["unet"] |= {"block_out_channels": (32, 64, 64, 64), "attention_head_dim": (1, 2, 2, 2), "sample_size": 8}
    configs["vae"] |= {"block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "sample_size": 64}
    configs["text_encoder"] |= {"num_hidden_layers": 2, "intermediate_size": 256, "vocab_size": 1000}
    return configs


def _small_sd2() -> models.Base:
    configs = small_sd2_configs()
    parts = models.build_parts(families.SD2, configs)
    te = families.SD2.text_encoders[0]
    return models.Base(**parts, tokenizer=models.tokenizer_for(te), device=torch.device("cpu"), dtype=torch.float32,
                       scheduler=models.make_scheduler(families.SD2, configs["scheduler"]), name="sd2-small",
                       source="sd2-small", single_file=None, model_hash="0" * 10, family=families.SD2)


def _scramble(base: models.Base, seed: int) -> models.Base:
    """Every parameter distinct random values: norms start at ones and biases at zeros, which would hide a swap."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in base.modules().values():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return base


def _with_file(base: models.Base, folder) -> tuple[models.Base, object]:
    _scramble(base, seed=1)
    return base, models.save_single_file(base, folder / "model.safetensors")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(small SDXL base, its single file)."""
    return _with_file(models.load_base("sdxl-small-random", device="cpu"), tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """(small SD 2.x base, its single file)."""
    return _with_file(_small_sd2(), tmp_path_factory.mktemp("sd2"))


@pytest.fixture(params=["sdxl", "sd2"])
def model(request):
    return request.getfixturevalue(request.param)


def _assert_same_weights(expected: dict, actual: dict):
    """Every tensor of every component equal, and no component or tensor more or less."""
    assert expected.keys() == actual.keys()
    for name, module in expected.items():
        a, b = module.state_dict(), actual[name].state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


def _plain(config) -> dict:
    """A config as JSON has it (tuples as lists), without diffusers' bookkeeping."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def _param_owners(module):
    return {name for name, m in module.named_modules() if next(m.parameters(recurse=False), None) is not None}


def _meta_parts(family, configs=None) -> dict:
    with init_empty_weights():
        return models.build_parts(family, configs)


# ---------------------------------------------------------------- round trips

def test_maps_cover_every_parameter_owner_once(model):
    base, _ = model
    for module_map, module in ((ldm.unet_module_map(base.unet.config), base.unet),
                               (ldm.vae_module_map(base.vae.config), base.vae)):
        assert set(module_map.values()) == _param_owners(module)
        assert len(set(module_map.values())) == len(module_map)


def test_split_inverts_to_single_file(model):
    base, _ = model
    parts = ldm.split_single_file(ldm.to_single_file(base.modules(), base.family), base.family, base.modules())
    expected = {name: module.state_dict() for name, module in base.modules().items()}
    assert parts.keys() == expected.keys()
    for name, state in expected.items():
        assert parts[name].keys() == state.keys(), name
        assert all(torch.equal(parts[name][k], state[k]) for k in state), name


def test_file_round_trip_is_bit_exact(model):
    base, path = model
    loaded = models.load_base(str(path), device="cpu")
    assert (loaded.family, loaded.source, loaded.single_file) == (base.family, "single-file", path)
    _assert_same_weights(base.modules(), loaded.modules())
    # the small architecture came back from the file's metadata
    assert _plain(loaded.unet.config) == _plain(base.unet.config)
    assert loaded.scheduler.config.prediction_type == base.scheduler.config.prediction_type
    assert loaded.vae.config.scaling_factor == base.vae.config.scaling_factor


def test_diffusers_reads_the_same_weights(model, tmp_path):
    """diffusers' own single-file loader (offline, configs from a folder sdtune wrote) fills every tensor of every
    component with the value sdtune's model holds."""
    base, path = model
    config = models.save_diffusers(base, tmp_path / "config")
    pipe = PIPELINES[base.family.name].from_single_file(str(path), config=str(config), local_files_only=True)
    _assert_same_weights(base.modules(), {name: getattr(pipe, name) for name in base.modules()})


# ---------------------------------------------------------------- names and layouts

# Keys of the published SDXL 1.0 base checkpoint (sd_xl_base_1.0.safetensors); the small model has the same
# blocks and depths, so it has each of them.
REAL_SDXL_KEYS = [
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias",
    "conditioner.embedders.1.model.ln_final.weight",
    "conditioner.embedders.1.model.positional_embedding",
    "conditioner.embedders.1.model.text_projection",
    "conditioner.embedders.1.model.token_embedding.weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight",
    "conditioner.embedders.1.model.transformer.resblocks.1.ln_2.bias",
    "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_fc.weight",
    "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_proj.bias",
    "first_stage_model.decoder.up.0.block.0.conv1.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.post_quant_conv.weight",
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.0.proj.weight",
    "model.diffusion_model.input_blocks.6.0.op.weight",
    "model.diffusion_model.label_emb.0.0.weight",
    "model.diffusion_model.label_emb.0.2.bias",
    "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_out.0.weight",
    "model.diffusion_model.output_blocks.0.1.transformer_blocks.9.norm3.weight",
    "model.diffusion_model.output_blocks.2.2.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
    "model.diffusion_model.out.2.weight",
    "model.diffusion_model.time_embed.0.weight",
]


def _file_keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_sdxl_file_has_real_sgm_names(sdxl):
    _, path = sdxl
    keys = _file_keys(path)
    assert set(REAL_SDXL_KEYS) <= set(keys)
    assert all(k.startswith(tuple(ldm.component_prefixes(families.SDXL).values())) for k in keys)
    assert not any("text_model" in k or "logit_scale" in k for k in keys if k.startswith("conditioner.embedders.1."))
    assert not any(k.startswith("model.diffusion_model.output_blocks.8.2.") for k in keys)  # first level: no attention


def test_openclip_tensors(model):
    """The fused q/k/v projection is the three stacked; the projection matrix is applied as x @ P."""
    base, path = model
    te = base.family.text_encoders[-1]
    module = getattr(base, te.component)
    state, _ = load_state(path)
    layer = (module.text_model if hasattr(module, "text_model") else module).encoder.layers[1].self_attn
    fused = state[te.single_file_prefix + "transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused, torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
    resblocks = te.single_file_prefix + "transformer.resblocks."
    blocks = {k[len(resblocks):].split(".")[0] for k in state if k.startswith(resblocks)}
    assert blocks == {"0", "1"}
    projection = state.get(te.single_file_prefix + "text_projection")
    if base.family is families.SDXL:
        ids = torch.randn(3, module.config.hidden_size)
        assert torch.allclose(ids @ projection, module.text_projection(ids), rtol=1e-4, atol=1e-3)
    else:
        assert projection is None  # diffusers' SD 2.x encoder has no projection to write


def test_sd2_reads_what_original_files_carry_beyond_the_model(sd2, tmp_path):
    """Original SD 2.x files hold OpenCLIP's 24th block, its projection and temperature: read and dropped.
    A block beyond what SD 2.x files have is not SD 2.x."""
    base, path = sd2
    state, metadata = load_state(path)
    prefix = families.SD2.text_encoders[0].single_file_prefix
    block = {k.replace(".resblocks.1.", ".resblocks.2."): v.clone() for k, v in state.items()
             if k.startswith(prefix + "transformer.resblocks.1.")}
    extras = {prefix + "text_projection": torch.randn(1024, 512), prefix + "logit_scale": torch.tensor(4.6)}
    full = tmp_path / "full.safetensors"
    save_file(state | block | extras, str(full), metadata=metadata)
    _assert_same_weights(base.modules(), models.load_base(str(full), device="cpu").modules())

    beyond = {k.replace(".resblocks.2.", ".resblocks.24."): v for k, v in block.items()}
    save_file(state | beyond, str(tmp_path / "beyond.safetensors"), metadata=metadata)
    with pytest.raises(SdtuneError, match=r"beyond.safetensors: unexpected weight .*resblocks\.24\.") as caught:
        models.load_base(str(tmp_path / "beyond.safetensors"), device="cpu")
    assert "\n" not in str(caught.value)


def _diffusers_split(sd: dict, family, parts: dict, configs: dict) -> dict:
    """diffusers' converters (its reading side) on a whole state dict, per component, in our module naming."""
    out = {"unet": convert_ldm_unet_checkpoint(sd, configs["unet"]), "vae": convert_ldm_vae_checkpoint(sd, configs["vae"])}
    for te in family.text_encoders:
        if te.openclip:
            state = convert_open_clip_checkpoint(parts[te.component], sd, prefix=te.single_file_prefix)
        else:
            state = {k: v for k, v in convert_ldm_clip_checkpoint(sd).items() if k.startswith("text_model.")}
        keys = set(parts[te.component].state_dict())
        out[te.component] = {k if k in keys else k.removeprefix("text_model."): v for k, v in state.items()
                             if not k.endswith("position_ids")}
    return out


@pytest.mark.parametrize("family", [families.SDXL, families.SD2], ids=["sdxl", "sd2"])
def test_real_size_names_match_diffusers(family):
    """Names only (meta tensors), at the published sizes: every tensor of sdtune's file lands on the same key in
    sdtune's reader, diffusers' converters and the model; SD 2.x gets the 24th block the originals carry."""
    configs = family.component_configs()
    parts = _meta_parts(family, configs)
    sd = ldm.to_single_file(parts, family)
    if family is families.SD2:
        prefix = family.text_encoders[0].single_file_prefix
        assert f"{prefix}transformer.resblocks.22.ln_1.weight" in sd
        sd |= {k.replace(".resblocks.22.", ".resblocks.23."): v for k, v in sd.items() if ".resblocks.22." in k}
    ours = ldm.split_single_file(sd, family, parts)
    theirs = _diffusers_split(sd, family, parts, configs)
    for name, module in parts.items():
        assert ours[name].keys() == theirs[name].keys() == module.state_dict().keys(), name
        assert all(ours[name][k].shape == theirs[name][k].shape for k in ours[name]), name
    assert all(ours["unet"][k] is theirs["unet"][k] for k in ours["unet"])  # the very same source tensor


# ---------------------------------------------------------------- refusals and extras

def _without(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def test_sdxl_without_text_encoder_2_is_refused(sdxl, tmp_path):
    _, path = sdxl
    state, metadata = load_state(path)
    state = _without(state, "conditioner.embedders.1.")
    plain, ours = tmp_path / "plain.safetensors", tmp_path / "ours.safetensors"
    save_file(state, str(plain))  # detected from the weights
    save_file(state, str(ours), metadata=metadata)  # family named by sdtune's metadata
    for path, words in ((plain, "without the text encoder's .text_encoder_2: conditioner.embedders.1.model"),
                        (ours, r"has no text_encoder_2 weights \(conditioner.embedders.1.model.\*\)")):
        with pytest.raises(SdtuneError, match=words) as caught:
            models.load_base(str(path), device="cpu")
        message = str(caught.value)
        assert message.startswith(str(path)) and "pass a full checkpoint of SDXL" in message and "\n" not in message


def test_unknown_keys_refused_schedules_and_ema_dropped(model):
    base, _ = model
    sd = ldm.to_single_file(base.modules(), base.family)
    extras = {"model_ema.decay": torch.zeros(()), "denoiser.sigmas": torch.zeros(3), "alphas_cumprod": torch.zeros(3)}
    parts = ldm.split_single_file(sd | extras, base.family, base.modules())
    assert {k: len(v) for k, v in parts.items()} == {k: len(m.state_dict()) for k, m in base.modules().items()}
    prefix = base.family.text_encoders[-1].single_file_prefix
    for key in (prefix + "transformer.resblocks.0.attn.bogus_weight", "conditioner.embedders.7.model.x",
                ldm.UNET_PREFIX + "input_blocks.99.0.op.weight"):
        with pytest.raises(SdtuneError, match=f"unexpected weight {key}: not a {base.family.title} model"):
            ldm.split_single_file(sd | {key: torch.zeros(1)}, base.family, base.modules())


def test_clip_names_with_or_without_text_model_level(sdxl):
    """SDXL's first encoder as the original files name it (``transformer.text_model.*``) or in transformers-5
    naming (no ``text_model.`` level) reads the same."""
    base, _ = sdxl
    sd = ldm.to_single_file(base.modules(), base.family)
    prefix = base.family.text_encoders[0].single_file_prefix
    flat = {k.replace(prefix + "text_model.", prefix): v for k, v in sd.items()}
    assert flat.keys() != sd.keys()
    ours, theirs = (ldm.split_single_file(s, base.family, base.modules()) for s in (sd, flat))
    assert ours["text_encoder"].keys() == theirs["text_encoder"].keys() == base.text_encoder.state_dict().keys()
    assert all(ours["text_encoder"][k] is theirs["text_encoder"][k] for k in ours["text_encoder"])


def test_ckpt_without_metadata_detects_the_family(model, tmp_path, monkeypatch):
    """A .ckpt (read without unpickling code) carries no configs: the family comes from the weights and its
    shipped configs, here replaced by the small ones."""
    base, _ = model
    small = {"sdxl": model_names.small_sdxl_configs, "sd2": small_sd2_configs}[base.family.name]()
    monkeypatch.setattr(families, "_read_configs", lambda name: small)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": ldm.to_single_file(base.modules(), base.family), "global_step": 1}, path)
    loaded = models.load_base(str(path), device="cpu")
    assert loaded.family is base.family
    _assert_same_weights(base.modules(), loaded.modules())


def test_inspect_describes_a_checkpoint_from_its_header(sdxl, tmp_path, capsys):
    """`sdtune inspect` on a checkpoint: family, parameters per component, dtypes, EMA, the prediction sdtune
    samples it with, and A1111's model hash (the file's sha256, as generate writes it), reading no weight."""
    base, path = sdxl
    state, metadata = load_state(path)
    marked = tmp_path / "vpred.safetensors"  # fp16, an EMA copy, v-prediction, ModelSpec metadata, no sdtune configs
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    configs = {k: v for k, v in json.loads(metadata[checkpoints.META_CONFIGS]).items() if k != "scheduler"}
    save_file(half | {"model_ema.decay": torch.tensor(0.9999), "v_pred": torch.zeros(0)}, str(marked),
              metadata={"modelspec.title": "NoobAI-XL V-Pred", checkpoints.META_ARCH: "sdxl",
                        checkpoints.META_CONFIGS: json.dumps(configs)})
    assert main(["inspect", str(marked), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in base.modules().items()}
    assert info["components"] == counts and info["parameters"] == sum(counts.values())
    assert (info["family"], info["prediction"], info["zero_terminal_snr"], info["ema_tensors"]) == (
        "sdxl", "v_prediction", False, 1)
    assert set(info["dtypes"]) == {"float16"}
    assert info["hashes"]["autov2"] == models.load_base(str(marked), device="cpu").model_hash
    # A1111's first model hash (kohya's model_hash): the 64 KiB at 1 MiB
    assert info["hashes"]["autov1"] == hashlib.sha256(marked.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert info["metadata"] == {"modelspec.title": "NoobAI-XL V-Pred", checkpoints.META_ARCH: "sdxl"}
    assert main(["inspect", str(marked)]) == 0
    text = capsys.readouterr().out
    assert "base family  SDXL" in text and "prediction   v_prediction" in text and f"unet {counts['unet']:,}" in text
    ckpt = tmp_path / "model.ckpt"  # a pickle, through the safe loader: the family from the widths
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("conditioner.embedders.1.")}}, ckpt)
    assert main(["inspect", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sdxl" and info["components"]["text_encoder_2"] == 0
    assert "text_encoder_2 MISSING" in inspect.render(info)
    # what loading refuses, inspect says: an inpainting UNet (9 input channels), SDXL's refiner (cross width 1280)
    conv_in = models.ldm.UNET_PREFIX + "input_blocks.0.0.weight"
    cross = next(k for k in state if k.endswith("attn2.to_k.weight"))
    for name, changed, says in (
            ("inpaint", {conv_in: torch.zeros(state[conv_in].shape[0], 9, 3, 3)},
             "no: the UNet takes 9 input channels (an inpainting or instruct-pix2pix model)"),
            ("refiner", {cross: torch.zeros(state[cross].shape[0], 1280)}, "no: an SDXL refiner")):
        save_file(state | changed, str(tmp_path / f"{name}.safetensors"))
        assert main(["inspect", str(tmp_path / f"{name}.safetensors")]) == 0
        assert f"sdtune loads it  {says}" in capsys.readouterr().out


def test_inspect_describes_a_model_folder_and_names_a_models_part(sdxl, tmp_path, capsys):
    """A diffusers model folder (what --model and merge --out take) is described from its headers; a component's
    file alone is named as such, not asked whether it is a LoRA."""
    base, _ = sdxl
    folder = models.save_diffusers(base, tmp_path / "model")
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in base.modules().items()}
    assert (info["kind"], info["family"], info["components"], info["prediction"]) == (
        "model folder", "sdxl", counts, "epsilon")
    assert main(["inspect", str(folder)]) == 0
    assert "diffusers model folder (give it as --model)" in capsys.readouterr().out
    for part, says in (("unet/diffusion_pytorch_model.safetensors", "a bare diffusers UNet"),
                       ("text_encoder_2/model.safetensors", "a text encoder's weights alone")):
        assert main(["inspect", str(folder / part)]) == 2
        assert says in capsys.readouterr().err
