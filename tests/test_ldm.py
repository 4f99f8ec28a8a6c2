"""LDM <-> diffusers name maps, checked against the models themselves and against diffusers' own converter."""

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel

from sdtune import families, ldm
from sdtune.safeio import SdtuneError
from sdtune.tiny import model as tiny_model


def _meta_models(configs):
    with init_empty_weights():
        text = {k: v for k, v in configs["text_encoder"].items() if k not in ("architectures", "model_type")}
        return (UNet2DConditionModel(**configs["unet"]), AutoencoderKL(**configs["vae"]),
                CLIPTextModel(CLIPTextConfig(**text)))


@pytest.fixture(scope="module")
def tiny():
    parts = tiny_model.build(seed=3)
    return parts["unet"], parts["vae"], parts["text_encoder"]


@pytest.fixture(scope="module", params=["tiny", "sd15"])
def arch(request):
    configs = families.get("tiny" if request.param == "tiny" else "sd1").component_configs()
    return request.param, _meta_models(configs)


def _modules(parts):
    unet, vae, text_encoder = parts
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def _param_owners(module):
    return {name for name, m in module.named_modules() if next(m.parameters(recurse=False), None) is not None}


def test_maps_cover_every_parameter_owner_once(arch):
    _, (unet, vae, _) = arch
    for module_map, model in ((ldm.unet_module_map(unet.config), unet), (ldm.vae_module_map(vae.config), vae)):
        assert set(module_map.values()) == _param_owners(model)
        assert len(set(module_map.values())) == len(module_map)  # one-to-one


def test_sd15_names():
    unet_map = ldm.unet_module_map(families.SD1.component_configs()["unet"])
    assert len(unet_map) == 391
    expected = {
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q":
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
        "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks.11.0.out_layers.3": "down_blocks.3.resnets.1.conv2",
        "middle_block.1.proj_in": "mid_block.attentions.0.proj_in",
        "middle_block.2.emb_layers.1": "mid_block.resnets.1.time_emb_proj",
        "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj":
            "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj",
        "time_embed.0": "time_embedding.linear_1",
        "out.2": "conv_out",
    }
    for old, new in expected.items():
        assert unet_map[old] == new
    vae_map = ldm.vae_module_map(families.SD1.component_configs()["vae"])
    assert vae_map["encoder.down.0.block.0.conv1"] == "encoder.down_blocks.0.resnets.0.conv1"
    assert vae_map["decoder.up.3.block.2.conv2"] == "decoder.up_blocks.0.resnets.2.conv2"
    assert "decoder.up.0.upsample.conv" not in vae_map  # the highest-resolution level does not upsample
    assert vae_map["decoder.up.1.upsample.conv"] == "decoder.up_blocks.2.upsamplers.0.conv"
    assert vae_map["encoder.mid.attn_1.proj_out"] == "encoder.mid_block.attentions.0.to_out.0"


def test_tiny_names():
    unet_map = ldm.unet_module_map(families.TINY.component_configs()["unet"])  # 3 blocks, layers_per_block=1
    assert unet_map["input_blocks.2.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert unet_map["input_blocks.3.1.proj_in"] == "down_blocks.1.attentions.0.proj_in"
    assert unet_map["input_blocks.5.0.in_layers.2"] == "down_blocks.2.resnets.0.conv1"
    assert unet_map["output_blocks.1.1.conv"] == "up_blocks.0.upsamplers.0.conv"  # UpBlock2D: no attention slot
    assert unet_map["output_blocks.3.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert "input_blocks.7.0.op" not in unet_map


def test_round_trip_is_exact(tiny):
    unet, vae, text_encoder = tiny
    sd = ldm.to_ldm_state_dict(unet, vae, text_encoder)
    assert all(k.startswith((ldm.UNET_PREFIX, ldm.VAE_PREFIX, ldm.TEXT_PREFIX)) for k in sd)
    assert sd[ldm.VAE_PREFIX + "encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in LDM
    parts = ldm.split_single_file(sd, families.TINY, _modules(tiny))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        expected = module.state_dict()
        assert parts[name].keys() == expected.keys()
        assert all(torch.equal(parts[name][k], expected[k]) for k in expected)


def test_tiny_matches_diffusers_converter(tiny):
    unet, vae, text_encoder = tiny
    sd = ldm.to_ldm_state_dict(unet, vae, text_encoder)
    for converted, module in ((convert_ldm_unet_checkpoint(sd, dict(unet.config)), unet),
                              (convert_ldm_vae_checkpoint(sd, dict(vae.config)), vae)):
        expected = module.state_dict()
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[k], expected[k]) for k in expected)
    clip = {ldm.text_encoder_key(k): v for k, v in convert_ldm_clip_checkpoint(sd).items()}
    clip.pop("embeddings.position_ids")
    expected = text_encoder.state_dict()
    assert clip.keys() == expected.keys() and all(torch.equal(clip[k], expected[k]) for k in expected)


def test_sd15_matches_diffusers_converter():
    """Names only (meta tensors): each LDM tensor lands on the same diffusers key in both converters."""
    configs = families.SD1.component_configs()
    unet, vae, text_encoder = _meta_models(configs)
    sd = ldm.to_ldm_state_dict(unet, vae, text_encoder)
    ours = ldm.split_single_file(sd, families.SD1, _modules((unet, vae, text_encoder)))
    theirs = convert_ldm_unet_checkpoint(sd, configs["unet"])
    assert theirs.keys() == ours["unet"].keys() == unet.state_dict().keys()
    assert all(theirs[k] is ours["unet"][k] for k in theirs)  # the very same source tensor
    theirs = convert_ldm_vae_checkpoint(sd, configs["vae"])
    assert theirs.keys() == ours["vae"].keys() == vae.state_dict().keys()
    assert all(theirs[k].shape == ours["vae"][k].shape == vae.state_dict()[k].shape for k in theirs)
    reshaped = {k for k in theirs if ".attentions." in k and k.endswith("weight") and "group_norm" not in k}
    assert len(reshaped) == 8
    assert all(theirs[k] is ours["vae"][k] for k in theirs.keys() - reshaped)
    assert len(ours["text_encoder"]) == len(text_encoder.state_dict()) == 196


def test_text_encoder_names():
    for key in ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                "text_model.encoder.layers.0.self_attn.q_proj.weight",
                "encoder.layers.0.self_attn.q_proj.weight"):
        assert ldm.text_encoder_key(key) == "encoder.layers.0.self_attn.q_proj.weight"
    assert ldm.text_encoder_state({"text_model.final_layer_norm.bias": 1}) == {"final_layer_norm.bias": 1}


def test_split_ignores_training_extras_and_refuses_foreign_keys(tiny):
    unet, vae, text_encoder = tiny
    sd = ldm.to_ldm_state_dict(unet, vae, text_encoder)
    extras = {"betas": torch.zeros(3), "alphas_cumprod": torch.zeros(3), "model_ema.decay": torch.zeros(()),
              "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(1),
              "first_stage_model.loss.logvar": torch.zeros(())}
    parts = ldm.split_single_file(sd | extras, families.TINY, _modules(tiny))
    assert len(parts["unet"]) == len(unet.state_dict())
    with pytest.raises(SdtuneError, match="unexpected weight model.diffusion_model.input_blocks.99.0.op.weight"):
        ldm.split_single_file(sd | {"model.diffusion_model.input_blocks.99.0.op.weight": torch.zeros(1)},
                              families.TINY, _modules(tiny))
