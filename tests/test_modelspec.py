"""ModelSpec metadata (modelspec.*), as sd-scripts writes it into the LoRAs and embeddings it trains: the
architecture by family and prediction type (read back by sdtune's own family detection), the training facts,
kohya's --metadata_* settings under its names, and the trigger word of TI and pivotal tuning."""

import pytest
import torch
from small_runs import outline_dataset, settings

from sdtune import families, modelspec
from sdtune.safeio import SdtuneError, read_metadata
from sdtune.train.config import TISettings, load_settings
from sdtune.train.lora import train_lora
from sdtune.train.ti import train_ti


@pytest.mark.parametrize("family, prediction, kind, arch, impl", [
    (families.SD1, "epsilon", "lora", "stable-diffusion-v1/lora", "diffusers"),
    (families.SD2, "epsilon", "lora", "stable-diffusion-v2-512/lora", "diffusers"),
    (families.SD2, "v_prediction", "lora", "stable-diffusion-v2-768-v/lora", "diffusers"),
    (families.SDXL, "epsilon", "lora", "stable-diffusion-xl-v1-base/lora", modelspec.STABILITY),
    (families.SDXL, "v_prediction", "ti", "stable-diffusion-xl-v1-base/textual-inversion", modelspec.STABILITY),
    (families.SD1, "epsilon", "ti", "stable-diffusion-v1/textual-inversion", modelspec.STABILITY),
    (families.TINY, "epsilon", "lora", "sdtune-tiny/lora", "diffusers"),
])
def test_the_architecture_is_sd_scripts_id_and_reads_back_as_the_family(family, prediction, kind, arch, impl):
    meta = modelspec.metadata(family, {"prediction_type": prediction}, kind, title="t", resolution=512, created=0)
    assert meta["modelspec.architecture"] == arch and meta["modelspec.implementation"] == impl
    assert meta["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.resolution"] == "512x512"
    # sdtune's own reading of a file's family (the tiny models' ids are their own, which SD 1.x's reader ignores)
    assert families.by_modelspec_architecture(arch) == (family if family.configs else None)


def test_a_trained_lora_and_embedding_carry_it(base, tmp_path):
    data = outline_dataset(tmp_path / "data")
    for caption in data.glob("*.txt"):
        caption.write_text("<ms> " + caption.read_text())
    path = train_lora(base, settings(data, tmp_path / "lora", steps=2, ti_token="<ms>", ti_init="square",
                                     min_timestep=100, clip_skip=2, metadata_author="Ada",
                                     metadata_tags="outline, style"))
    meta = read_metadata(path)
    spec = {k: v for k, v in meta.items() if k.startswith("modelspec.")}
    assert spec.pop("modelspec.date")[:4].isdigit()
    assert spec == {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "sdtune-tiny/lora",
                    "modelspec.implementation": "diffusers", "modelspec.title": "lora", "modelspec.resolution": "64x64",
                    "modelspec.prediction_type": "epsilon", "modelspec.encoder_layer": "2",
                    "modelspec.timestep_range": "100,1000", "modelspec.trigger_phrase": "<ms>",
                    "modelspec.author": "Ada", "modelspec.tags": "outline, style"}
    assert meta["ss_clip_skip"] == spec["modelspec.encoder_layer"]  # one count, kohya's
    ti = TISettings(data=str(data), out=str(tmp_path / "ti"), token="<mt>", init_token="star", steps=2, batch_size=2,
                    sample_steps=2, progress=False, report=False, formats=["diffusers", "a1111"],
                    metadata_title="My star", metadata_license="CC-BY-4.0")
    emb = train_ti(base, ti)
    meta = read_metadata(emb)
    assert (meta["modelspec.architecture"], meta["modelspec.title"], meta["modelspec.trigger_phrase"],
            meta["modelspec.license"]) == ("sdtune-tiny/textual-inversion", "My star", "<mt>", "CC-BY-4.0")
    assert torch.load(tmp_path / "ti" / "mt.pt", weights_only=True)["name"] == "<mt>"  # the .pt: no place for it


def test_kohyas_metadata_keys_read_from_a_config_file(tmp_path):
    cfg = tmp_path / "kohya.toml"
    cfg.write_text('metadata_title = "Outline"\nmetadata_description = "draws outlines"\n')
    s = load_settings(cfg, {}, "lora")
    assert s.user_metadata() == {"title": "Outline", "author": "", "description": "draws outlines", "license": "",
                                 "tags": ""}
    cfg.write_text('metadata_autor = "Ada"\n')
    with pytest.raises(SdtuneError, match="did you mean 'metadata_author'"):
        load_settings(cfg, {}, "lora")
