"""LoRA on SDXL and SD 2.x: every layout sdtune reads gives the weights diffusers (or PEFT) fuses.

Oracle: diffusers' ``load_lora_weights`` + ``set_adapters([a, b], [0.5, 1.0])`` + ``fuse_lora`` on a second,
identical model (``load_base`` is deterministic), then every weight of unet, text_encoder and text_encoder_2
is compared with sdtune's ``base.loras.add(a, 0.5)``, ``add(b, 1.0)``: untouched weights must be identical,
touched ones equal within ``REL_TOL`` of the weight change (the same fp32 sums in another order: PEFT adds
B @ A per adapter, sdtune one addmm over the stacked factors). Where diffusers refuses a layout (LyCORIS LoHa
and LoKr) the test says so and checks against ΔW computed here from the raw factors in float64 instead.
Raw PEFT adapters (``base_model.model.…`` + ``adapter_config.json``) are checked against PEFT itself.

The LoRA files are written here key by key with safetensors (random factors of the right shapes), on
``sdxl-small-random`` (SDXL's names and block structure, small widths) and on a small SD 2.x-shaped model;
the real SD 2.x files in ../shared/fixtures/lora are checked on a model with SD 2.x's real UNet widths.
"""

import json
import logging
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune import families, models
from sdtune.ldm import unet_module_map
from sdtune.lora import formats, inspect, keys
from sdtune.lora.neutral import TEXT_COMPONENTS, Adapter, Lora, text_paths
from sdtune.safeio import SdtuneError

pytest.importorskip("peft")
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402

REL_TOL = 1e-5  # |sdtune - oracle| / |oracle - W0| per weight: fp32 sums in another order
WEIGHTS = (0.5, 1.0)
XL_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
UNET_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                "mlp.fc2")
# LoCon: resnet convs, their time projections and shortcuts, down/upsamplers, and SDXL's added-condition MLP
UNET_CONVS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
              "add_embedding.linear_1", "add_embedding.linear_2", "time_embedding.linear_1")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tests compare thousands of small tensors; on a shared 2-core machine thread hand-offs cost more than
    the work (1.0 s vs 0.26 s per full SDXL-small comparison at load 7). Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------ targets and file writers

def _is_layer(m) -> bool:
    return isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))


def attention_targets(base, components=XL_COMPONENTS) -> list[tuple[str, str, tuple]]:
    """(component, neutral path, weight shape): UNet transformer linears of blocks 0 and 9 (SDXL stacks up to
    10 per attention) and proj_in/out, every text-encoder linear."""
    out = []
    for comp in components:
        for path, m in getattr(base, comp).named_modules():
            if not _is_layer(m):
                continue
            if comp == "unet":
                block = path.split("transformer_blocks.")[1].split(".")[0] if "transformer_blocks." in path else None
                keep = path.endswith(UNET_LINEARS) and (block in (None, "0", "9"))
            else:
                keep = path.endswith(TEXT_LINEARS)
            if keep:
                out.append((comp, path.removeprefix("text_model."), tuple(m.weight.shape)))
    return out


def conv_targets(base) -> list[tuple[str, str, tuple]]:
    return [("unet", p, tuple(m.weight.shape)) for p, m in base.unet.named_modules()
            if _is_layer(m) and p.endswith(UNET_CONVS)]


def factors(shape, rank, g, scale=0.1):
    """kohya/PEFT factor shapes: linear [r, in] / [out, r]; conv [r, in, kh, kw] / [out, r, 1, 1]."""
    kernel = shape[2:]
    down = torch.randn(rank, shape[1], *kernel, generator=g) * scale
    up = torch.randn(shape[0], rank, *((1, 1) if kernel else ()), generator=g) * scale
    return down, up


def kohya_name(family, comp, path, ldm_names=None) -> str:
    if comp == "unet":
        return "lora_unet_" + (ldm_names.get(path, path) if ldm_names else path).replace(".", "_")
    prefix = family.text_encoder(comp).kohya_prefix
    return prefix + ("text_model." + path).replace(".", "_")


def write_kohya(path, family, targets, seed, rank, alpha, ldm_names=None):
    """kohya/A1111 layout: <prefix><name>.lora_down.weight / .lora_up.weight / .alpha (one alpha per file:
    diffusers applies only the most common alpha of a kohya file)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for comp, p, shape in targets:
        name = kohya_name(family, comp, p, ldm_names)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = factors(shape, rank, g)
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                                       "ss_base_model_version": family.base_model_version})
    return path


def write_lycoris(path, family, targets, seed, algo, alpha):
    """LyCORIS kohya-named LoHa (hada_w1_a…, rank 4) or LoKr (lokr_w1 full, lokr_w2_a/b rank 4; the factor
    split 4 x (out/4) by (in/4)... chosen here so every shape divides)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for comp, p, shape in targets:
        name = kohya_name(family, comp, p)
        out, inner = shape[0], int(torch.tensor(shape[1:]).prod())
        if algo == "loha":
            for i in ("1", "2"):
                sd[f"{name}.hada_w{i}_a"] = torch.randn(out, 4, generator=g) * 0.3
                sd[f"{name}.hada_w{i}_b"] = torch.randn(4, inner, generator=g) * 0.3
        else:
            sd[f"{name}.lokr_w1"] = torch.randn(4, 4, generator=g) * 0.3
            sd[f"{name}.lokr_w2_a"] = torch.randn(out // 4, 4, generator=g) * 0.3
            sd[f"{name}.lokr_w2_b"] = torch.randn(4, inner // 4, generator=g) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path), metadata={"ss_network_module": "lycoris.kohya",
                                       "ss_network_args": json.dumps({"algo": algo})})
    return path


def lycoris_delta(sd: dict, name: str, shape) -> torch.Tensor:
    """ΔW of one LyCORIS module with LyCORIS' own formulas, in float64."""
    t = {k.split(".", 1)[1]: v.double() for k, v in sd.items() if k.split(".", 1)[0] == name}
    if "hada_w1_a" in t:
        d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (t["alpha"] / 4)
    else:
        d = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * (t["alpha"] / 4)
    return d.reshape(shape)


def _peft_config(targets, rank, alpha) -> dict:
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted({p for _, p, _ in targets}),
            "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True, "use_rslora": False, "use_dora": False}


def write_diffusers(path, targets, seed, rank, alpha):
    """diffusers/PEFT layout: unet.<path>.lora_A.weight, text_encoder(_2).text_model.<path>.lora_A.weight, each
    component's LoraConfig in the lora_adapter_metadata header (what diffusers' save_lora_weights writes)."""
    g = torch.Generator().manual_seed(seed)
    sd, header = {}, {}
    for comp, p, shape in targets:
        key = f"{comp}.text_model.{p}" if comp in TEXT_COMPONENTS else f"{comp}.{p}"
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = factors(shape, rank, g)
    for comp in {c for c, _, _ in targets}:
        mine = [t for t in targets if t[0] == comp]
        # target_modules as paths without text_model.: PEFT matches them as suffixes of the module names
        header |= {f"{comp}.{k}": v for k, v in _peft_config(mine, rank, alpha).items()}
    save_file(sd, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(header)})
    return path


def write_raw_peft(folder, comp, targets, seed, rank, alpha):
    """PEFT ``save_pretrained`` of one component: base_model.model.<path>.lora_A.weight + adapter_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    mine = [t for t in targets if t[0] == comp]
    for _, p, shape in mine:
        key = f"base_model.model.{'text_model.' if comp in TEXT_COMPONENTS else ''}{p}"
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = factors(shape, rank, g)
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {**_peft_config(mine, rank, alpha), "peft_type": "LORA", "task_type": None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder / "adapter_model.safetensors"


# ------------------------------------------------------------------ comparing

def snapshot(base, components) -> dict[str, dict[str, torch.Tensor]]:
    return {c: {k: v.detach().clone() for k, v in getattr(base, c).state_dict().items()} for c in components}


def assert_restored(base, pristine):
    for comp, state in pristine.items():
        for k, v in getattr(base, comp).state_dict().items():
            assert torch.equal(v, state[k]), f"{comp}.{k} not restored bit for bit"


def assert_matches(base, want: dict, pristine: dict, touched: set) -> float:
    """Every weight of ``base`` equals ``want`` (exactly where untouched, to REL_TOL of the change where
    touched); returns the worst relative error."""
    worst = 0.0
    for comp, state in want.items():
        got = getattr(base, comp).state_dict()
        assert set(got) == set(state), comp
        for k, w in state.items():
            module = k.rsplit(".", 1)[0].removeprefix("text_model.")
            if (comp, module) in touched and k.endswith(".weight"):
                change = (w - pristine[comp][k]).norm()  # fp32 differences of close values are exact
                assert change > 0, f"the oracle did not change {comp}.{k}"
                rel = ((got[k] - w).norm() / change).item()
                worst = max(worst, rel)
                assert rel < REL_TOL, f"{comp}.{k}: relative error {rel:.2e}"
            else:
                assert torch.equal(got[k], w), f"{comp}.{k} should be untouched"
    return worst


def diffusers_fused(pipe, files, components, weights=WEIGHTS) -> dict:
    """The pipeline's component weights after diffusers fuses ``files`` at ``weights``, then its original
    weights back (copied in place, so the same model serves the next case)."""
    original = snapshot(pipe, components)
    names = [f"a{i}" for i in range(len(files))]
    for name, f in zip(names, files):
        pipe.load_lora_weights(str(f), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=list(weights))
    pipe.fuse_lora(components=list(components), lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the PEFT wrappers
    fused = snapshot(pipe, components)
    for comp in components:
        getattr(pipe, comp).load_state_dict(original[comp])
    return fused


def sdtune_against(base, want, files, pristine, weights=WEIGHTS) -> float:
    """Add ``files`` at ``weights`` with ``base.loras``, compare with ``want``, remove them, check the base."""
    for i, (f, w) in enumerate(zip(files, weights)):
        base.loras.add(f"a{i}", f, w)
    touched = {(c, p) for row in base.loras.list() for c, p in base.loras._entries[row["name"]].targets}
    worst = assert_matches(base, want, pristine, touched)
    base.loras.remove_all()
    assert_restored(base, pristine)
    return worst


def expected_from(pristine, deltas: dict, weights) -> dict:
    """Base weights plus Σ w·ΔW (ΔW per (component, path) per adapter, float64), as fp32 state dicts."""
    want = {c: dict(s) for c, s in pristine.items()}
    for (comp, path), per_adapter in deltas.items():
        key = f"{path}.weight" if f"{path}.weight" in want[comp] else f"text_model.{path}.weight"
        w = want[comp][key].double()
        for d, weight in zip(per_adapter, weights):
            w = w + weight * d
        want[comp][key] = w.float()
    return want


# ------------------------------------------------------------------ SDXL

@pytest.fixture(scope="module")
def xl():
    return models.load_base("sdxl-small-random", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def xl_pipe():
    """diffusers' SDXL pipeline on a second, identical model."""
    pipe = models.load_base("sdxl-small-random", device="cpu", dtype="fp32").pipeline()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    return pipe


@pytest.fixture(scope="module")
def xl_pristine(xl, xl_pipe):
    pristine = snapshot(xl, XL_COMPONENTS)
    assert_restored(xl_pipe, pristine)  # the two loads are the same model
    return pristine


@pytest.fixture(scope="module")
def xl_sgm_names(xl):
    return {d: ldm for ldm, d in unet_module_map(xl.unet.config).items()}  # label_emb included


def _xl_case(tmp_path, xl, xl_pipe, xl_pristine, write, *args):
    files = [write(tmp_path / f"{i}.safetensors", *args, seed=i + 1) for i in range(2)]
    return sdtune_against(xl, diffusers_fused(xl_pipe, files, XL_COMPONENTS), files, xl_pristine)


def test_sdxl_kohya_diffusers_names(tmp_path, xl, xl_pipe, xl_pristine):
    targets = attention_targets(xl)

    def write(path, seed):
        return write_kohya(path, families.SDXL, targets, seed, rank=4 * seed, alpha=8.0)
    worst = _xl_case(tmp_path, xl, xl_pipe, xl_pristine, write)
    lora = formats.load_lora(tmp_path / "0.safetensors")
    assert {c: len(m) for c, m in lora.modules.items()} == {c: sum(t[0] == c for t in targets) for c in XL_COMPONENTS}
    assert keys.guess_family(lora) == families.SDXL and not lora.unknown
    print(f"kohya diffusers-named: worst relative error {worst:.1e}")


def test_sdxl_kohya_sgm_names(tmp_path, xl, xl_pipe, xl_pristine, xl_sgm_names):
    targets = attention_targets(xl)
    assert any("input_blocks_7_1_transformer_blocks_9" in kohya_name(families.SDXL, c, p, xl_sgm_names)
               for c, p, _ in targets)

    def write(path, seed):
        return write_kohya(path, families.SDXL, targets, seed, rank=4, alpha=2.0 * seed, ldm_names=xl_sgm_names)
    worst = _xl_case(tmp_path, xl, xl_pipe, xl_pristine, write)
    print(f"kohya SGM-named: worst relative error {worst:.1e}")


def test_sdxl_locon_sgm_names_convs_and_label_emb(tmp_path, xl, xl_pipe, xl_pristine, xl_sgm_names):
    targets = conv_targets(xl) + attention_targets(xl, ("unet",))[:40]
    paths = {p for _, p, _ in targets}
    assert {"add_embedding.linear_1", "down_blocks.1.resnets.0.conv_shortcut", "up_blocks.0.upsamplers.0.conv"} <= paths
    assert any(len(s) == 4 and s[2:] == (3, 3) for _, _, s in targets)

    def write(path, seed):
        return write_kohya(path, families.SDXL, targets, seed, rank=4, alpha=3.0, ldm_names=xl_sgm_names)
    worst = _xl_case(tmp_path, xl, xl_pipe, xl_pristine, write)
    sd = formats.load_lora(tmp_path / "0.safetensors")
    assert "add_embedding.linear_2" in sd.modules["unet"] and not sd.unknown
    print(f"LoCon SGM-named: worst relative error {worst:.1e}")


def test_sdxl_comfyui_layout_reads_as_the_kohya_file_it_spells(tmp_path, xl, xl_pipe, xl_pristine, xl_sgm_names):
    """ComfyUI's LoraSave writes diffusion_model.<SGM path> and text_encoders.clip_l|clip_g.transformer.<path>
    keys, with kohya's suffixes: sdtune reads the same adapters as from the kohya file with those names, and
    patches what diffusers patches from that kohya file (diffusers does not read ComfyUI's layout)."""
    targets = attention_targets(xl) + conv_targets(xl)[:6]
    named = {kohya_name(families.SDXL, c, p, xl_sgm_names): (c, p) for c, p, _ in targets}
    kohya_files, comfy_files = [], []
    for seed in (1, 2):
        kohya = write_kohya(tmp_path / f"k{seed}.safetensors", families.SDXL, targets, seed, rank=4, alpha=2.0,
                            ldm_names=xl_sgm_names)
        comfy = {}
        for key, value in load_file(str(kohya)).items():
            name, _, suffix = key.partition(".")
            comp, p = named[name]
            where = ("diffusion_model." + xl_sgm_names.get(p, p) if comp == "unet" else
                     f"text_encoders.{'clip_l' if comp == 'text_encoder' else 'clip_g'}.transformer.text_model.{p}")
            comfy[f"{where}.{suffix}"] = value
        save_file(comfy, str(tmp_path / f"c{seed}.safetensors"))
        kohya_files.append(kohya)
        comfy_files.append(tmp_path / f"c{seed}.safetensors")
    worst = sdtune_against(xl, diffusers_fused(xl_pipe, kohya_files, XL_COMPONENTS), comfy_files, xl_pristine)
    comfy, kohya = formats.load_lora(comfy_files[0]), formats.load_lora(kohya_files[0])
    assert not comfy.unknown and comfy.modules.keys() == kohya.modules.keys()
    for comp, modules in kohya.modules.items():
        assert comfy.modules[comp].keys() == modules.keys() and len(modules) == sum(c == comp for c, _, _ in targets)
        for path, adapter in modules.items():
            theirs = comfy.modules[comp][path]
            assert (theirs.kind, theirs.alpha, theirs.tensors.keys()) == (adapter.kind, adapter.alpha,
                                                                          adapter.tensors.keys())
            assert all(torch.equal(t, theirs.tensors[role]) for role, t in adapter.tensors.items())
    print(f"ComfyUI layout: worst relative error {worst:.1e}")


def test_sdxl_kohya_output_in_sgm_names_as_sd_scripts_writes(tmp_path, xl, xl_pipe, xl_pristine, xl_sgm_names):
    """sdtune writes SDXL's kohya keys in SGM names (sd-scripts' own UNet), which A1111 matches as they are
    (``lora_unet_`` -> ``diffusion_model_``): with diffusers names its SD 1.x block arithmetic puts up_blocks.0's
    upsampler on output_blocks.2.1 (SDXL's is 2.2) and has no name for add_embedding. diffusers fuses them as
    sdtune patches, add_embedding included."""
    targets = conv_targets(xl) + attention_targets(xl)[:60]
    sgm_modules = {keys.underscored(n) for n in xl_sgm_names.values()}

    def write(path, seed):  # diffusers-named in, converted by sdtune
        src = write_kohya(tmp_path / f"src{seed}.safetensors", families.SDXL, targets, seed, rank=4, alpha=2.0)
        formats.convert(src, path, to="kohya")
        return path
    worst = _xl_case(tmp_path, xl, xl_pipe, xl_pristine, write)
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        unet = {k.split(".")[0].removeprefix("lora_unet_") for k in f.keys() if k.startswith("lora_unet_")}
    assert unet <= sgm_modules and len(unet) == sum(c == "unet" for c, _, _ in targets)
    assert {"label_emb_0_0", "label_emb_0_2", "time_embed_0", "output_blocks_2_2_conv", "input_blocks_3_0_op",
            "input_blocks_4_0_skip_connection", "input_blocks_1_0_emb_layers_1"} <= unet
    print(f"kohya output in SGM names: worst relative error {worst:.1e}")


def test_sdxl_diffusers_peft_layout(tmp_path, xl, xl_pipe, xl_pristine):
    targets = attention_targets(xl)

    def write(path, seed):
        return write_diffusers(path, targets, seed, rank=4, alpha=6.0 * seed)
    worst = _xl_case(tmp_path, xl, xl_pipe, xl_pristine, write)
    lora = formats.load_lora(tmp_path / "1.safetensors")
    assert lora.format == "diffusers" and {ad.scale for _, _, ad in lora.items()} == {3.0}
    print(f"diffusers/PEFT layout: worst relative error {worst:.1e}")


def test_sdxl_mix_of_layouts(tmp_path, xl, xl_pipe, xl_pristine, xl_sgm_names):
    targets = attention_targets(xl)
    files = [write_kohya(tmp_path / "a.safetensors", families.SDXL, targets, 5, rank=8, alpha=4.0,
                         ldm_names=xl_sgm_names),
             write_diffusers(tmp_path / "b.safetensors", targets[::2], 6, rank=2, alpha=5.0)]
    worst = sdtune_against(xl, diffusers_fused(xl_pipe, files, XL_COMPONENTS), files, xl_pristine)
    print(f"kohya SGM + diffusers at {WEIGHTS}: worst relative error {worst:.1e}")


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_sdxl_lycoris_against_its_formulas(tmp_path, algo, xl, xl_pipe, xl_pristine):
    """diffusers refuses LyCORIS LoHa/LoKr files, so ΔW is computed here from the raw factors instead."""
    targets = [t for t in attention_targets(xl) if len(t[2]) == 2][::3]
    files = [write_lycoris(tmp_path / f"{i}.safetensors", families.SDXL, targets, i + 1, algo, alpha=2.0 + i)
             for i in range(2)]
    with pytest.raises((ValueError, KeyError)):
        xl_pipe.load_lora_weights(str(files[0]), adapter_name="lycoris")
    from safetensors.torch import load_file

    raw = [load_file(str(f)) for f in files]
    deltas = {(c, p): [lycoris_delta(sd, kohya_name(families.SDXL, c, p), s) for sd in raw] for c, p, s in targets}
    want = expected_from(xl_pristine, deltas, WEIGHTS)
    worst = sdtune_against(xl, want, files, xl_pristine)
    assert formats.load_lora(files[0]).format == f"lycoris-{algo}"
    print(f"LyCORIS {algo}: worst relative error {worst:.1e}")


def test_sdxl_raw_peft_adapters_against_peft(tmp_path, xl, xl_pristine):
    """PEFT save_pretrained folders (unet, and text_encoder_2 whose keys name no encoder: its 1280 width
    does) against PEFT's own merge."""
    from peft import PeftModel

    targets = attention_targets(xl)
    files = {comp: write_raw_peft(tmp_path / comp, comp, targets, seed, rank=4, alpha=12.0)
             for seed, comp in enumerate(("unet", "text_encoder_2"), 1)}
    oracle = models.load_base("sdxl-small-random", device="cpu", dtype="fp32")
    want = {}
    for comp, f in files.items():
        merged = PeftModel.from_pretrained(getattr(oracle, comp), str(f.parent)).merge_and_unload()
        want[comp] = {k: v.clone() for k, v in merged.state_dict().items()}
    want["text_encoder"] = xl_pristine["text_encoder"]
    lora = formats.load_lora(files["text_encoder_2"])
    assert set(lora.modules["text_encoder_2"]) and not lora.modules["text_encoder"]
    assert lora.format == "peft" and {ad.scale for _, _, ad in lora.items()} == {3.0}
    worst = sdtune_against(xl, want, list(files.values()), xl_pristine, weights=(1.0, 1.0))
    print(f"raw PEFT vs PEFT merge_and_unload: worst relative error {worst:.1e}")


def layer_weight(module, comp, path) -> torch.Tensor:
    for p in text_paths(path) if comp in TEXT_COMPONENTS else (path,):
        try:
            return module.get_submodule(p).weight
        except AttributeError:
            continue
    raise KeyError(path)


def test_sdxl_per_component_weights_and_exact_restore(tmp_path, xl, xl_pristine):
    targets = attention_targets(xl)
    f = write_kohya(tmp_path / "k.safetensors", families.SDXL, targets, 9, rank=4, alpha=4.0)
    lora = formats.load_lora(f, model_keys=xl.loras.modules)
    probe = {c: next(p for cc, p, _ in targets if cc == c) for c in XL_COMPONENTS}

    def check(expect):
        for comp, w in zip(XL_COMPONENTS, expect):
            got = layer_weight(getattr(xl, comp), comp, probe[comp]).double()
            key = next(k for k in xl_pristine[comp] if k.endswith(probe[comp] + ".weight"))
            w0 = xl_pristine[comp][key]
            if w == 0:
                assert torch.equal(got.float(), w0), comp  # no contribution: the original tensor itself
                continue
            want = w0.double() + w * lora.modules[comp][probe[comp]].delta(w0.shape, dtype=torch.float64)
            assert ((got - want).norm() / (want - w0.double()).norm()) < REL_TOL, (comp, w)

    xl.loras.add("k", lora, (1.0, 0.5))  # (unet, te): te applies to both encoders
    check((1.0, 0.5, 0.5))
    row = xl.loras.list()[0]
    assert (row["te_weight"], row["te2_weight"], row["te2_layers"]) == (0.5, 0.5, 12)
    xl.loras.set_weights({"k": (1.0, 0.5, -1.0)})
    check((1.0, 0.5, -1.0))
    xl.loras.set_weights({"k": {"text_encoder_2": 0.0}})  # components not named keep their weights
    check((1.0, 0.5, 0.0))
    xl.loras.set_weights({"k": 2.0})
    check((2.0, 2.0, 2.0))
    with pytest.raises(SdtuneError, match="give one number"):
        xl.loras.set_weights({"k": (1.0, 2.0, 3.0, 4.0)})
    xl.loras.remove("k")
    assert_restored(xl, xl_pristine)


def test_sdxl_file_refused_on_sd1_and_sd1_file_on_sdxl(tmp_path, xl, xl_sgm_names):
    targets = attention_targets(xl)
    f = write_kohya(tmp_path / "xl.safetensors", families.SDXL, targets, 3, rank=4, alpha=4.0, ldm_names=xl_sgm_names)
    sd1 = models.load_base("tiny-random", device="cpu", dtype="fp32")
    with pytest.raises(SdtuneError, match="this LoRA is for SDXL; the model is the built-in tiny model"):
        sd1.loras.add("xl", f)
    assert len(sd1.loras) == 0
    reference = keys.reference(families.SD1)
    with pytest.raises(SdtuneError, match=r"this LoRA is for SDXL; the model is SD 1\.x"):
        keys.match(formats.load_lora(f), reference).raise_if_bad(source="xl")
    sd1_file = tmp_path / "sd1.safetensors"
    sd1_targets = [("unet", p, s) for p, s in reference["unet"].items() if p.endswith("attn2.to_k")]
    write_kohya(sd1_file, families.SD1, sd1_targets, 4, rank=4, alpha=4.0)
    with pytest.raises(SdtuneError, match=r"this LoRA is for SD 1\.x; the model is SDXL"):
        xl.loras.add("sd1", sd1_file)
    with pytest.raises(SdtuneError, match=r"give one number, \(unet_weight, text_encoder_weight\), or a "
                                          r"\{component: weight\} dict of unet, text_encoder$"):
        sd1.loras.add("triple", sd1_file, (1.0, 1.0, 1.0))  # one text encoder: no third weight


def test_sdxl_convert_kohya_diffusers_round_trip_and_inspect(tmp_path, xl, xl_sgm_names):
    targets = attention_targets(xl)
    src = write_kohya(tmp_path / "k.safetensors", families.SDXL, targets, 7, rank=4, alpha=2.0, ldm_names=xl_sgm_names)
    original = formats.load_lora(src)  # no model: SGM names resolved against SDXL's own structure
    assert {(c, p) for c, p, _ in original.items()} == {(c, p) for c, p, _ in targets}
    formats.convert(src, tmp_path / "d.safetensors", to="diffusers")
    formats.convert(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", to="kohya")
    with safe_open(str(tmp_path / "k2.safetensors"), "pt") as f:
        meta, names = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    prefixes = {n.split("text_model")[0] for n in names if "text_model" in n}
    assert prefixes == {"lora_te1_", "lora_te2_"}
    for path in (tmp_path / "d.safetensors", tmp_path / "k2.safetensors"):
        back = formats.load_lora(path)
        assert {(c, p) for c, p, _ in back.items()} == {(c, p) for c, p, _ in original.items()}
        for comp, p, ad in original.items():
            got = back.modules[comp][p]
            assert all(torch.equal(got.tensors[k], v) for k, v in ad.tensors.items()) and got.scale == ad.scale

    info = inspect.describe(src)
    counts = {c: sum(t[0] == c for t in targets) for c in XL_COMPONENTS}
    assert info["family"] == "sdxl" and info["modules"] == counts
    # made for the small SDXL: its attention projections have real SDXL's text widths, its MLPs and UNet do not
    assert info["fits"] == {"unet": 0, "text_encoder": 8, "text_encoder_2": 8}
    text = inspect.render(info)
    assert "SDXL (as its metadata says)" in text and "text_encoder_2 8 of 12" in text
    # the family a file states, by kohya's version or ModelSpec's architecture (shown with the rest of its metadata),
    # else the one its layers point to
    tensors = load_file(str(src))
    for name, meta, said in (("bare", {}, "SDXL (guess, from its layers)"),
                             ("spec", {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                                       "modelspec.title": "my pony style"}, "SDXL (as its metadata says)")):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=meta)
        text = inspect.render(inspect.describe(tmp_path / f"{name}.safetensors"))
        assert said in text and all(v in text for v in meta.values()), text
    # the model it was trained on, and a known fine-tune of the family by that name (its LoRAs are made for it)
    for trained_on, fine_tune in (("ponyDiffusionV6XL_v6StartWithThisOne.safetensors", "Pony Diffusion"),
                                  ("Illustrious-XL-v0.1.safetensors", "Illustrious"),
                                  ("noobaiXLNAIXL_vPred10Version.safetensors", "NoobAI (an Illustrious fine-tune)"),
                                  ("sd_xl_base_1.0.safetensors", None)):
        save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"ss_sd_model_name": trained_on,
                                                                       "ss_base_model_version": "sdxl_base_v1-0"})
        info = inspect.describe(tmp_path / "t.safetensors")
        assert (info["trained_on"], info["fine_tune"]) == (trained_on, fine_tune)
        row = next(line for line in inspect.render(info).splitlines() if line.startswith("trained on"))
        assert row.split(None, 2)[2] == trained_on + (f" ({fine_tune}: made for it and its fine-tunes; it may draw "
                                                      f"poorly on other SDXL models)" if fine_tune else "")
    # a LoRA of no family's widths (SDXL's refiner reads 1280-wide text): named as such, no fit against SD 1.x
    refiner = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(4, 1280),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(768, 4)}
    save_file(refiner, str(tmp_path / "refiner.safetensors"))
    info = inspect.describe(tmp_path / "refiner.safetensors")
    text = inspect.render(info)
    assert info["fits"] == {} and "fits SD" not in text
    assert "unknown (its cross-attention reads 1280-wide text: an SDXL refiner" in text
    # given to an SDXL model, its refusal says why in those words, not only which shapes differ
    with pytest.raises(SdtuneError, match=r"refiner\.safetensors: this LoRA is for SDXL's refiner \(its "
                                          r"cross-attention reads 1280-wide text\), an img2img model sdtune does not "
                                          r"load\. 1 of 1 LoRA entries do not fit"):
        xl.loras.add("refiner", tmp_path / "refiner.safetensors", 1.0)
    assert not len(xl.loras)


# ------------------------------------------------------------------ SD 2.x

def small_sd2_configs() -> dict:
    """SD 2.x's layout (linear projections, 1024-wide OpenCLIP text, v-prediction) at small widths."""
    configs = families.SD2.component_configs()
    configs["unet"] |= {"block_out_channels": [32, 64, 64, 64], "attention_head_dim": [1, 2, 2, 2],
                        "sample_size": 8, "layers_per_block": 1}
    configs["vae"] |= {"block_out_channels": [32, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
                       "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1}
    configs["text_encoder"] |= {"num_hidden_layers": 2, "intermediate_size": 256}
    return configs


def sd2_base(configs=None, unet=None) -> models.Base:
    configs = configs or small_sd2_configs()
    torch.manual_seed(0)
    parts = models.build_parts(families.SD2, configs)
    if unet is not None:
        parts["unet"] = unet
    te = families.SD2.text_encoders[0]
    return models.Base(**parts, tokenizer=models.tokenizer_for(te),
                       scheduler=models.make_scheduler(families.SD2, configs["scheduler"]),
                       device=torch.device("cpu"), dtype=torch.float32, name="sd2-small", source="test",
                       single_file=None, model_hash="0" * 10, family=families.SD2)


def test_sd2_kohya_and_diffusers_against_diffusers(tmp_path):
    base, oracle = sd2_base(), sd2_base()
    pristine = snapshot(base, ("unet", "text_encoder"))
    assert_restored(oracle, pristine)
    targets = attention_targets(base, ("unet", "text_encoder"))
    assert {s[1] for c, p, s in targets if p.endswith("attn2.to_k")} == {1024}
    files = [write_kohya(tmp_path / "k.safetensors", families.SD2, targets, 1, rank=4, alpha=8.0),
             write_diffusers(tmp_path / "d.safetensors", targets, 2, rank=8, alpha=4.0)]
    lora = formats.load_lora(files[0])
    assert keys.guess_family(lora) == families.SD2 and set(lora.modules["text_encoder"])
    pipe = oracle.pipeline()
    assert isinstance(pipe, StableDiffusionPipeline)
    want = diffusers_fused(pipe, files, ("unet", "text_encoder"))
    worst = sdtune_against(base, want, files, pristine)
    print(f"SD 2.x kohya + diffusers: worst relative error {worst:.1e}")
    out = tmp_path / "k2.safetensors"
    formats.convert(files[1], out, to="kohya")
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v2" and f.metadata()["ss_v2"] == "True"
        assert any(k.startswith("lora_te_text_model_") for k in f.keys())
    formats.convert(out, tmp_path / "d2.safetensors", to="diffusers")
    with safe_open(str(tmp_path / "d2.safetensors"), "pt") as f:  # A1111 reads the base from these keys
        assert f.metadata()["ss_base_model_version"] == "sd_v2" and f.metadata()["ss_v2"] == "True"


def sd2_real_unet() -> torch.nn.Module:
    """SD 2.x's real UNet (865 M parameters): built without initialisation, zeros everywhere, random weights
    only on the attention linears the fixtures touch (the rest plays no part, and random init of it all would
    cost most of the test's time)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**families.SD2.component_configs()["unet"])
    unet.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in unet.named_parameters():
            t.zero_()
            if ".attn1." in name or ".attn2." in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    return unet.eval()


def test_real_sd2_fixtures_against_diffusers(fixtures_dir):
    lora_dir = fixtures_dir / "lora"
    files = [lora_dir / "vfph55_my_lora__pytorch_lora_weights.safetensors",
             lora_dir / "IvanBy12_imagenes__pytorch_lora_weights.safetensors"]
    for f in files:
        lora = formats.load_lora(f)
        assert keys.guess_family(lora) == families.SD2 and len(lora.modules["unet"]) == 128 and not lora.unknown
    base = sd2_base(unet=sd2_real_unet())
    attention = {n: p.detach().clone() for n, p in base.unet.named_parameters() if ".attn" in n}
    for i, (f, w) in enumerate(zip(files, WEIGHTS)):
        base.loras.add(f"a{i}", f, w)
    touched = {p for row in base.loras.list() for _, p in base.loras._entries[row["name"]].targets}
    assert len(touched) == 128
    mine = {p: base.unet.get_submodule(p).weight.detach().clone() for p in touched}
    base.loras.remove_all()
    for n, p in base.unet.named_parameters():
        assert torch.equal(p, attention[n]) if n in attention else not p.any(), f"{n} not restored bit for bit"
    # diffusers on the very same modules, now that sdtune has put them back
    pipe = base.pipeline()
    pipe.load_lora_weights(str(files[0]), adapter_name="a0")
    pipe.load_lora_weights(str(files[1]), adapter_name="a1")
    pipe.set_adapters(["a0", "a1"], adapter_weights=list(WEIGHTS))
    pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=["a0", "a1"])
    pipe.unload_lora_weights()
    worst = 0.0
    for p, got in mine.items():
        want, w0 = base.unet.get_submodule(p).weight, attention[f"{p}.weight"]
        rel = ((got - want).norm() / (want - w0).norm()).item()
        assert rel < REL_TOL, p
        worst = max(worst, rel)
    print(f"real SD 2.x fixtures at {WEIGHTS}: worst relative error {worst:.1e}")


def test_a_lora_trained_on_a_built_in_model_is_taken_for_it():
    """tiny-xl's files say sdxl_base_v1-0 (A1111 reads them as SDXL) and, without a LoRA on the cross-attention's
    key and value (tiny-xl's preset), no layer width tells the two apart: the model name they carry does."""
    def lora(path, inner, **meta):
        made = Lora(metadata={"ss_base_model_version": "sdxl_base_v1-0", **meta})
        made.modules["unet"] = {path: Adapter("lora", {"down": torch.zeros(2, inner), "up": torch.zeros(8, 2)}, 2.0)}
        return made
    attn1 = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert keys.guess_family(lora(attn1, 8)) == families.SDXL
    assert keys.guess_family(lora(attn1, 8, ss_sd_model_name="tiny-xl")) == families.TINY_XL
    # a layer that only SDXL has outweighs the name
    attn2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert keys.guess_family(lora(attn2, 2048, ss_sd_model_name="tiny-xl")) == families.SDXL
    # a file whose widths only the tiny models have, claiming SDXL without the model's name (a merge drops it):
    # tiny-xl, not the one-encoder tiny (whose reading of the SGM names wrote a diffusers file tiny-xl refused)
    width = families.TINY.text_encoders[0].width
    made = lora(attn1, 8)
    made.modules["text_encoder"] = {"encoder.layers.0.self_attn.q_proj": Adapter(
        "lora", {"down": torch.zeros(2, width), "up": torch.zeros(width, 2)}, 2.0)}
    assert keys.guess_family(made) == families.TINY_XL
    made.metadata = {}
    assert keys.guess_family(made) == families.TINY  # no claim: the fewest text encoders
