"""The family descriptions: their shipped configs build the published architectures, and lookups by width
and by kohya metadata find the right family."""

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdtune import families
from sdtune.families.build import module_table
from sdtune.tiny import model as tiny

# Parameter counts of the published models (UNet, VAE, each text encoder), in millions, rounded.
PUBLISHED = {"sd1": (860, 84, (123,)), "sd2": (866, 84, (340,)), "sdxl": (2567, 84, (123, 695))}
CLASSES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}


def millions(module) -> int:
    return round(sum(p.numel() for p in module.parameters()) / 1e6)


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_configs_build_the_published_architectures(name):
    family = families.get(name)
    configs = family.component_configs()
    with init_empty_weights():
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        encoders = [CLASSES[te.model_class](CLIPTextConfig(**{k: v for k, v in configs[te.component].items()
                                                              if k not in ("architectures", "model_type")}))
                    for te in family.text_encoders]
    unet_m, vae_m, te_m = PUBLISHED[name]
    assert (millions(unet), millions(vae), tuple(millions(e) for e in encoders)) == (unet_m, vae_m, te_m)
    assert unet.config.cross_attention_dim == family.cross_attention_width == sum(
        te.width for te in family.text_encoders)
    assert [e.config.hidden_size for e in encoders] == list(family.text_widths)
    assert family.component_configs() is not family.component_configs()  # callers may edit their copy
    assert configs["scheduler"]["prediction_type"] == family.prediction_type


def test_lookups():
    assert families.by_cross_attention(768) is families.SD1
    assert families.by_cross_attention(2048) is families.SDXL
    assert families.by_cross_attention(4096) is None
    assert [(f.name, te.component) for f, te in families.by_text_width(1280)] == [("sdxl", "text_encoder_2")]
    assert families.describe_width(1024) == "SD 2.x"
    assert families.describe_width(768) == "SD 1.x or SDXL's text_encoder"
    assert families.by_base_model_version("sdxl_base_v1-0") is families.SDXL
    assert families.by_base_model_version("sd_v2_768_v") is families.SD2
    assert families.by_base_model_version("something_else") is None
    sdxl = families.SDXL
    assert [te.kohya_prefix for te in sdxl.text_encoders] == ["lora_te1_", "lora_te2_"]
    assert [te.embedding_key for te in sdxl.text_encoders] == ["clip_l", "clip_g"]
    with pytest.raises(KeyError):
        families.SD1.text_encoder("text_encoder_2")


def test_tiny_family_matches_the_tiny_model():
    parts = tiny.build(seed=0)
    assert parts["unet"].config.cross_attention_dim == families.TINY.cross_attention_width
    assert parts["text_encoder"].config.hidden_size == families.TINY.text_widths[0]
    assert isinstance(parts["text_encoder"], CLIPTextModel) and torch.is_tensor(
        parts["text_encoder"].get_input_embeddings().weight)


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_shipped_module_tables_are_what_the_libraries_build(name):
    """``Family.modules`` (data, so the file tools import neither library) holds every weight-owning module of
    the UNet and text encoders, in diffusers' registration order (the cloneofsimo layout counts in it), as the
    installed diffusers and transformers build them; text-encoder paths without ``text_model.`` (transformers 4
    and CLIPTextModelWithProjection keep that level). If this fails, rerun tools/module_tables.py."""
    family = families.get(name)
    shipped = family.modules()
    built = module_table(family)
    assert list(shipped) == ["unet", *(te.component for te in family.text_encoders)]
    for component, paths in built.items():
        assert list(shipped[component].items()) == [(p, tuple(shape)) for p, shape in paths.items()], component
    assert not any(p.startswith("text_model.") for c in shipped if c != "unet" for p in shipped[c])
    encoder = shipped[family.text_encoders[-1].component]
    assert encoder["encoder.layers.0.self_attn.q_proj"] == (family.text_widths[-1],) * 2
