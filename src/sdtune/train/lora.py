"""LoRA training: low-rank updates ΔW = (alpha / rank) · up @ down learned on a frozen model.

Each targeted layer (a Linear or Conv2d of the UNet, optionally of every text encoder: SDXL's two, each at
its own learning rate, ``--te-lr`` and ``--te2-lr``) is wrapped for the
run: ``y = W x + scale · up(down(dropout(x)))``, ``down`` initialised like a fresh layer and ``up`` at zero,
so training starts from the base model exactly. Convolutions get a ``down`` conv with the layer's kernel,
stride and padding and a 1x1 ``up`` (LoCon). Targets, by module name (SD 1.x):

- ``attn``: attention projections to_q/to_k/to_v/to_out.0 (text encoder: q/k/v/out_proj)
- ``attn+ff``: + feed-forward ff.net.0.proj/ff.net.2 and proj_in/proj_out (kohya's default; text encoder:
  + mlp.fc1/fc2)
- ``all``: + the resnets' convs, time_emb_proj and shortcut, and the down/upsampler convs
A ``--conv-rank`` adds the resnet and sampler layers to any target set; 3x3 convs then use that rank.
``--exclude`` takes layers out again by regular expression (as kohya's ``exclude_patterns``).

At the end the wrappers are taken out again (the base is unchanged) and the learned matrices become a
neutral ``Lora``, written in the kohya layout (the family's prefixes: ``lora_te_``, or SDXL's ``lora_te1_``
and ``lora_te2_``, and its ``ss_base_model_version``) with ``ss_*`` metadata (the run's whole settings included, as
``ss_sdtune_settings``) and on request the diffusers layout. ``report.html`` then shows each checkpoint at
strengths 0 to 1.

Options beside the LoRA itself: ``--ti-token`` trains a new word with it (pivotal tuning, ``pivotal``: the word
is saved inside each LoRA file and beside it), ``--reg-dir`` / ``--class-prompt`` add class images to every step
(prior preservation, ``prior``), ``--masked-loss`` weights the loss by a mask per image (``masks``).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .. import modelspec
from ..console import note
from ..families import kohya_clip_skip
from ..generate import read_layer
from ..lora import algos, blocks
from ..lora.algos.norm import NormLayer
from ..lora.formats import load_lora, sampling_metadata, save_lora
from ..lora.hashes import file_sha256, old_model_hash
from ..lora.neutral import TEXT_COMPONENTS, Adapter, Lora, text_path
from ..lora.patch import check_fit
from ..models import vae_swapped
from ..safeio import SdtuneError
from ..version import __version__
from . import loop, optimizers, report, samples, validation
from .captions import steady_caption
from .config import LORA_ALGOS, LORA_SETTINGS_KEY, LORAPLUS, LoraSettings, to_toml
from .data import seed_for, training_set
from .kohya_config import ALGO_SWITCHES, NETWORK_ARGS
from .pivotal import Pivot, check_captions
from .prior import make_class_images, prior_set
from .scan import first_prompts, report_skipped, scan_data

UNET_ATTN = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
UNET_FF = re.compile(r"(\.ff\.net\.(0\.proj|2)|\.attentions\.\d+\.(proj_in|proj_out))$")
UNET_RESNET = re.compile(r"(\.resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|\.(down|up)samplers\.\d+\.conv)$")
# LyCORIS's train_norm: the norms inside the blocks it targets (a transformer's with attn+ff, a resnet's with its
# convolutions); the text encoders' sit outside the attention and MLP modules LyCORIS targets there
UNET_NORM_ATTN = re.compile(r"\.attentions\.\d+\.(norm|transformer_blocks\.\d+\.norm[123])$")
UNET_NORM_RESNET = re.compile(r"\.resnets\.\d+\.norm[12]$")
TE_ATTN = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
TE_MLP = re.compile(r"\.mlp\.(fc1|fc2)$")
TE_LAYER = re.compile(r"\.encoder\.layers\.(\d+)\.")


SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --save-precision


def _label(algo) -> str:
    """An algorithm as users name it (LoRA, LoKr, DoRA...)."""
    return algo.label or ("LoRA" if algo.name == "lora" else algo.name)


def _neutral(comp: str, path: str) -> tuple[str, str]:
    """A layer's key as a LoRA file's neutral form names it (text encoders without ``text_model.``)."""
    return comp, text_path(path) if comp in TEXT_COMPONENTS else path


def unet_targets(unet: nn.Module, targets: str, with_convs: bool, norms: bool = False) -> list[str]:
    """Module paths of the UNet layers that get a LoRA (``norms``: and the norm layers of LyCORIS's train_norm)."""
    found = []
    for name, module in unet.named_modules():
        dotted = "." + name
        if norms and _is_norm(module):
            if (targets != "attn" and UNET_NORM_ATTN.search(dotted)) or \
                    ((targets == "all" or with_convs) and UNET_NORM_RESNET.search(dotted)):
                found.append(name)
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if (UNET_ATTN.search(dotted) or (targets != "attn" and UNET_FF.search(dotted))
                or ((targets == "all" or with_convs) and UNET_RESNET.search(dotted))):
            found.append(name)
    return found


def te_targets(text_encoder: nn.Module, targets: str, layers: int | None = None) -> list[str]:
    """Module paths of the text-encoder layers that get a LoRA, in its first ``layers`` encoder layers (all)."""
    found = []
    for name, module in text_encoder.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        dotted = "." + name
        layer = TE_LAYER.search(dotted)
        if layers is not None and layer and int(layer.group(1)) >= layers:
            continue
        if TE_ATTN.search(dotted) or (targets != "attn" and TE_MLP.search(dotted)):
            found.append(name)
    return found


def used_layers(te, model: nn.Module, family, clip_skip: int = 1) -> int:
    """How many of a text encoder's layers the UNet's conditioning depends on: up to the hidden layer it reads
    (SDXL's first encoder: all but the last, whose LoRA would never get a gradient; fewer with a clip skip), all
    of them when the encoder's pooled output conditions the UNet too (SDXL's second)."""
    total = model.config.num_hidden_layers
    pooled = family.pooled_and_time_ids and te.model_class == "CLIPTextModelWithProjection"
    layer, _ = read_layer(te, model, clip_skip)
    return total if layer == -1 or pooled else total + 1 + layer


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm))


def _is_3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _full_rank(module: nn.Module) -> int:
    """The rank of the layer's whole weight: a LoRA of more holds more numbers than the change it can make."""
    w = module.weight
    return min(w.shape[0], w[0].numel())


def _check_ranks(modules, rank: int, conv_rank: int, conv_flag: str) -> None:
    """A rank above every layer it trains (a typo, 100000 for 100) would allocate huge factors that learn nothing a
    full-size change could not: refused before any is made. Above some layers only is usual (kohya's ranks)."""
    for flag, value, picked in (("--rank", rank, [m for *_, m in modules if not _is_3x3(m)]),
                                (conv_flag, conv_rank, [m for *_, m in modules if _is_3x3(m)])):
        largest = max(map(_full_rank, picked), default=0)
        if picked and value > largest:
            raise SdtuneError(f"{flag} {value}: above the full rank of every layer it trains (the largest is "
                              f"{largest}); choose {largest} or less (LoRAs are usually rank 4 to 128)")


def _conv_rank(settings: LoraSettings) -> int:
    return settings.conv_rank or (settings.rank if settings.targets == "all" else 0)


def _conv_alpha(settings: LoraSettings) -> float:
    if settings.conv_alpha is not None:
        return settings.conv_alpha
    # a --conv-rank of their own: scale 1; as plain targets of "all": --rank and --alpha like the rest. An alpha that
    # is no scale but a constraint (OFT's) stays the run's
    constraint = algos.get(settings.algo).alpha_is_constraint
    return float(settings.conv_rank) if settings.conv_rank and not constraint else settings.alpha


def plan_layers(base, settings: LoraSettings) -> tuple[list[tuple[str, str, nn.Module]], dict[str, nn.Module]]:
    """The layers a run trains, (component, path, module) each, and each component's root module; refused here
    when --exclude leaves a component none or a rank is above all of them."""
    conv_rank = _conv_rank(settings)
    plan = [("unet", base.unet, unet_targets(base.unet, settings.targets, conv_rank > 0, settings.train_norm))
            ] if settings.unet else []
    if settings.text_encoder:  # every text encoder of the family (SDXL: both)
        plan += [(te.component, model,
                  te_targets(model, settings.targets, used_layers(te, model, base.family, settings.clip_skip)))
                 for te, model, _ in base.text_encoders()]
    exclude = [re.compile(pattern) for pattern in settings.exclude]
    modules = []
    for comp, root, paths in plan:
        kept = [p for p in paths if not any(x.search(f"{comp}.{p}") for x in exclude)]
        if paths and not kept:  # the pattern took them all, not the model
            raise SdtuneError(f"--exclude {' '.join(settings.exclude)}: leaves none of the {len(paths)} layers "
                              f"--targets {settings.targets} picks in the {comp}; narrow the pattern (it is "
                              f"searched in names such as {comp}.{paths[0]})")
        if not kept:
            raise SdtuneError(f"--targets {settings.targets}: no matching layers in the {comp}; is it a "
                              f"Stable Diffusion model of a family sdtune knows?")
        modules += [(comp, p, root.get_submodule(p)) for p in kept]
    # blocks at 0 (--block-lr, --block-ranks) are not trained: their layers are left out, as kohya leaves them out
    for name, values in (("block_lr", block_lrs(base, settings, modules)),
                         ("block_ranks", block_ranks(base, settings, modules)[0])):
        if not values:
            continue
        for comp, _, _ in plan:
            if not any(values.get((c, p), 1) for c, p, _ in modules if c == comp):
                raise SdtuneError(f"--{name.replace('_', '-')} {getattr(settings, name)}: gives every {comp} layer "
                                  f"the run trains 0" + ("; give BASE a value, or leave out --text-encoder"
                                                         if comp in TEXT_COMPONENTS
                                                         else "; give a block that has layers a value"))
        modules = [m for m in modules if values.get(m[:2], 1)]
    if settings.train_norm and not any(_is_norm(m) for *_, m in modules):
        raise SdtuneError("--train-norm: no norm layer of the UNet is left to train (--targets attn+ff holds the "
                          "transformers', all the resnets' too; --exclude or a block at 0 took them)")
    ranks = block_ranks(base, settings, modules)[0]
    _check_ranks([m for m in modules if not _is_norm(m[2])], max([settings.rank, *ranks.values()]), conv_rank,
                 "--conv-rank" if settings.conv_rank else "--block-ranks" if ranks else "--rank")
    return modules, {comp: root for comp, root, _ in plan}


def _per_block(base, spec: str, flag: str, layers) -> dict[tuple[str, str], float]:
    """Each layer's value from a lora-block-weight vector or preset ``spec`` given as ``flag`` (nonnegative; 1 for
    a layer in no block). The blocks are those block weights use at generation (BASE: the text encoders)."""
    values = blocks.parse(spec, base.family, said=f"{flag} ")
    negative = next((block for block, v in values.items() if v < 0), None)
    if negative is not None:
        raise SdtuneError(f"{flag} {spec}: {negative} is {values[negative]:g}; give 0 (not trained) or more")
    return blocks.layer_factors(values, [m[:2] for m in layers], base.unet.config)


def block_lrs(base, settings: LoraSettings, layers) -> dict[tuple[str, str], float]:
    """--block-lr: each layer's factor on its component's learning rate ({} without the option); a layer in no
    block (the time embedding, conv_in/out) keeps its component's rate."""
    return _per_block(base, settings.block_lr, "--block-lr", layers) if settings.block_lr else {}


def block_ranks(base, settings: LoraSettings, layers) -> tuple[dict, dict]:
    """--block-ranks and --block-alphas (kohya's block_dims and block_alphas): each linear or 1x1 layer's rank and
    alpha by its block, ({}, {}) without them; a layer in no block, and the 3x3 convolutions (--conv-rank), keep
    --rank and --alpha. ``layers``: (component, path, module) each."""
    plain = [m for m in layers if not _is_3x3(m[2])]
    ranks = _per_block(base, settings.block_ranks, "--block-ranks", plain) if settings.block_ranks else {}
    odd = next((r for r in ranks.values() if r != int(r)), None)
    if odd is not None:
        raise SdtuneError(f"--block-ranks {settings.block_ranks}: {odd:g} is not a whole rank; give whole numbers")
    alphas = _per_block(base, settings.block_alphas, "--block-alphas", plain) if settings.block_alphas else {}
    # a layer in no block keeps the run's rank and alpha (layer_factors gives it 1)
    unet = blocks.unet_blocks(base.unet.config)
    for key in ranks.keys() | alphas.keys():
        if blocks.block_of(*key, unet) is None:
            ranks.pop(key, None)
            alphas.pop(key, None)
    return {k: int(r) for k, r in ranks.items()}, alphas


class Network:
    """The LoRA layers injected into a model for one training run."""

    def __init__(self, base, settings: LoraSettings, plan=None):
        """``plan``: ``plan_layers(base, settings)`` where the run made it already (for its refusals)."""
        g = torch.Generator().manual_seed(seed_for(settings.seed, "lora-init"))
        conv_rank, conv_alpha = _conv_rank(settings), _conv_alpha(settings)
        modules, self.roots = plan or plan_layers(base, settings)
        self.lr_factors = block_lrs(base, settings, modules)
        ranks, alphas = block_ranks(base, settings, modules)
        self.algo = algos.get(settings.algo)
        options = {"factor": settings.lokr_factor} if settings.algo == "lokr" else {}
        options |= {"blocks": settings.oft_blocks} if settings.oft_blocks else {}
        options |= {switch.option: True for name, switch in ALGO_SWITCHES.items() if getattr(settings, name)}
        if settings.rank_dropout or settings.module_dropout:
            options |= {"rank_dropout": settings.rank_dropout, "module_dropout": settings.module_dropout}
        start = self._starting_weights(base, settings, modules) if settings.network_weights else {}
        self.layers: dict[tuple[str, str], nn.Module] = {}
        for comp, path, module in modules:
            rank, alpha = (conv_rank, conv_alpha) if _is_3x3(module) else (
                ranks.get((comp, path), settings.rank), alphas.get((comp, path), settings.alpha))
            if settings.rs_lora:  # alpha/sqrt(rank) as the alpha/rank every loader computes
                alpha = alpha * math.sqrt(rank)
            given = start.get(_neutral(comp, path))
            if given is not None:  # the file's own rank and alpha (kohya's --dim_from_weights)
                rank = given.rank or rank
                alpha = given.alpha if given.alpha is not None else float(rank)
            if _is_norm(module):  # (train_norm's: whole changes, no rank or alpha)
                layer = NormLayer(module, settings.module_dropout)
            else:
                try:
                    layer = self.algo.layer(module, rank, alpha, settings.lora_dropout, g, **options)
                except SdtuneError as e:  # (a width the algorithm cannot split: BOFT's)
                    raise SdtuneError(f"{comp}.{path}: {e}") from None
            if given is not None:
                try:
                    layer.take(given.tensors)
                except SdtuneError as e:
                    raise SdtuneError(f"--network-weights {settings.network_weights}: {e}") from None
            self.layers[(comp, path)] = layer

    def _starting_weights(self, base, settings: LoraSettings, modules) -> dict[tuple[str, str], Adapter]:
        """--network-weights: the file's adapters by layer, each of this run's algorithm and on a layer it trains
        (anything else is one line: a layer left out would be lost from what the run continues)."""
        source = settings.network_weights
        model = {comp: m for comp, m in base.modules().items() if comp != "vae"}
        lora = load_lora(source, model_keys=model)
        adapters = check_fit(lora, model, allow_partial=False, source=source)
        if not settings.train_norm and any(ad.kind == NormLayer.algo.name for ad in adapters.values()):
            raise SdtuneError(f"--network-weights {source}: holds changes to norm layers (LyCORIS's train_norm), "
                              f"which this run does not train; add --train-norm")
        mine = {self.algo.name, NormLayer.algo.name}
        other = sorted({_label(ad.algo) for ad in adapters.values() if ad.kind not in mine})
        if other:  # (a Tucker LoCon's core is taken by a --tucker run: its layer says which way a mismatch goes)
            held = ", ".join(other)
            raise SdtuneError(f"--network-weights {source}: holds {held} adapters, and this run trains "
                              f"{_label(self.algo)} (--algo {settings.algo}); give the --algo it was "
                              f"trained with ({', '.join(LORA_ALGOS)})")
        trained = {_neutral(comp, path): module for comp, path, module in modules}
        outside = [key for key in adapters if key not in trained]
        if outside:
            comps = {comp for comp, _ in outside}
            hint = "--text-encoder" if comps & set(TEXT_COMPONENTS) and not settings.text_encoder else \
                "--targets attn+ff or all (all: the resnet convolutions too)"
            raise SdtuneError(f"--network-weights {source}: {len(outside)} of its layers are not ones this run "
                              f"trains (e.g. {'.'.join(outside[0])}); train them too ({hint}), or drop --exclude")
        fresh = len(trained) - len(adapters)
        if fresh:
            note(f"--network-weights {source}: {fresh} of the {len(trained)} layers this run trains are not in it; "
                 f"they start fresh")
        if lora.embeddings:
            note(f"--network-weights {source}: its embeddings ({', '.join(lora.embeddings)}) are not used; "
                 f"continue one with --ti-token and --ti-init")
        return adapters

    def inject(self) -> None:
        for (comp, path), layer in self.layers.items():
            self._put(comp, path, layer)

    def remove(self) -> None:
        for (comp, path), layer in self.layers.items():
            self._put(comp, path, layer.base)

    def _put(self, comp: str, path: str, module: nn.Module) -> None:
        parent_path, _, child = path.rpartition(".")
        parent = self.roots[comp].get_submodule(parent_path) if parent_path else self.roots[comp]
        setattr(parent, child, module)

    def param_groups(self, lrs: dict[str, float], up_ratios: dict[str, float] | None = None) -> list[dict]:
        """The optimizer's groups: one per component (``lrs``: its learning rate) and --block-lr factor, in the
        layers' order, each named for the logs ("unet", "unet x0.5", ...); with ``up_ratios`` (LoRA+: a component's
        ratio, 0 or absent for none) its up factors in groups of their own at that times the rate ("unet up")."""
        up_ratios = up_ratios or {}
        groups: dict[tuple[str, float, bool], list[nn.Parameter]] = {}
        for key, layer in self.layers.items():
            factor = self.lr_factors.get(key, 1.0)
            for role, param in layer.parts().items():
                groups.setdefault((key[0], factor, bool(up_ratios.get(key[0])) and role == "up"), []).append(param)
        return [{"params": params, "lr": lrs[comp] * factor * (up_ratios[comp] if up else 1), "component": comp,
                 "name": (comp if factor == 1 else f"{comp} x{factor:g}") + (" up" if up else "")}
                for (comp, factor, up), params in groups.items()]

    def set_training(self, on: bool) -> None:
        """Training mode (the dropouts) of the layers; their frozen base Linear/Conv2d has no mode-dependent part."""
        for layer in self.layers.values():
            layer.train(on)

    @torch.no_grad()
    def max_norm(self, limit: float) -> dict[str, float]:
        """kohya's max-norm regularisation (--scale-weight-norms): each layer whose ΔW has a Frobenius norm above
        ``limit`` is brought to ``limit`` (``limit_norm``). Returns kohya's three numbers for the logs: layers
        scaled, the mean and the largest norm after (read back once: one wait for a GPU, not one per layer)."""
        # (a norm layer's change has no factors to scale: LyCORIS's max-norm leaves it too)
        norms = torch.stack([layer.limit_norm(limit) for layer in self.layers.values() if hasattr(layer, "limit_norm")])
        after = norms.clamp(max=limit)
        scaled, mean, largest = torch.stack([(norms > limit).sum().float(), after.mean(), after.max()]).tolist()
        return {"max_norm/keys_scaled": int(scaled), "max_norm/average_key_norm": mean, "max_norm/max_key_norm": largest}

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{comp}:{path}.{role}": p.detach().cpu().clone()
                for (comp, path), layer in self.layers.items() for role, p in layer.parts().items()}

    def load_state(self, state: dict, source: Path) -> None:
        mine = self.state()
        if set(state) != set(mine) or any(state[k].shape != mine[k].shape for k in mine):
            raise SdtuneError(f"{source}: its LoRA layers differ from this run's (targets, rank or text encoder "
                              f"changed); use the same settings, or another --out")
        with torch.no_grad():
            for (comp, path), layer in self.layers.items():
                for role, p in layer.parts().items():
                    p.copy_(state[f"{comp}:{path}.{role}"])

    def to_lora(self, precision: str = "fp32") -> Lora:
        """The trained adapters, their tensors in ``precision`` (--save-precision); one line where a value is
        past fp16's range (the run's state, in fp32, is not touched by it)."""
        dtype = SAVE_DTYPES[precision]
        lora = Lora(format="sdtune")
        for (comp, path), layer in self.layers.items():
            _, clean = _neutral(comp, path)
            tensors = {role: t.to(dtype) for role, t in layer.tensors().items()}
            if not all(torch.isfinite(t).all() for t in tensors.values()):
                raise SdtuneError(f"--save-precision {precision}: {comp}.{clean} holds values past its range "
                                  f"(fp16: 65504); rerun with --save-precision bf16 or fp32 to save from the last "
                                  f"saved step")
            algo = NormLayer.algo if isinstance(layer, NormLayer) else self.algo
            alpha = float(layer.alpha) if algo.uses_alpha else None  # (IA3 and norms have none)
            lora.modules[comp][clean] = Adapter(algo.name, tensors, alpha)
        return lora


def loraplus_ratios(settings: LoraSettings, components) -> dict[str, float]:
    """Each component's LoRA+ ratio (0: off): kohya's UNet or text-encoder one where given, else the common one."""
    return {comp: (settings.loraplus_unet_lr_ratio if comp == "unet" else settings.loraplus_te_lr_ratio)
            or settings.loraplus_lr_ratio for comp in components}


def text_lrs(settings: LoraSettings, base) -> list[float]:
    """The learning rate of each text encoder: --te-lr (else --lr) for the first, --te2-lr (else the first's)
    for SDXL's second."""
    first = settings.te_lr if settings.te_lr is not None else settings.lr
    second = settings.te2_lr if settings.te2_lr is not None else first
    return [first, *[second] * (len(base.family.text_encoders) - 1)]


def _tag_frequency(scan) -> dict:
    """{folder: {tag: count}} over the captions' comma-separated tags (kohya's ss_tag_frequency), each folder as
    ss_dataset_dirs names it (the N_name folder, not a subfolder)."""
    freq: dict[str, Counter] = {}
    for ex in scan.examples:
        folder = ex.group
        tags = [t.strip() for t in (ex.caption or "").replace("\n", ",").split(",") if t.strip()]  # (--wildcards)
        freq.setdefault(folder, Counter()).update(tags)
    return {k: dict(v) for k, v in freq.items()}


def kohya_metadata(settings: LoraSettings, base, data, job: loop.Job, step: int, final: bool) -> dict:
    """Training facts in kohya's ``ss_*`` keys, which A1111, ComfyUI and LoRA browsers show."""
    m = job.metadata
    lrs = text_lrs(settings, base)
    per_epoch = max(1, m.get("batches_per_epoch", 1))
    sizes = Counter(data.bucket_of[i] for i in data.entries)
    meta = {
        "ss_session_id": str(seed_for(settings.seed, "session") % 2**31),
        "ss_training_started_at": str(m["started_at"]),  # the run's first start, kept across resumes
        "ss_output_name": settings.name,
        "ss_learning_rate": str(settings.lr),
        "ss_unet_lr": str(settings.lr) if settings.unet else "None",
        # "None" when no text-encoder LoRA is trained, as sd-scripts writes for a UNet-only run; SDXL's two rates
        # as the list sd-scripts takes and writes where they differ
        "ss_text_encoder_lr": ("None" if not settings.text_encoder else str(lrs[0]) if len(set(lrs)) == 1
                               else str(lrs)),
        "ss_num_train_images": str(len(data)),
        "ss_num_reg_images": "0",
        "ss_num_batches_per_epoch": str(per_epoch),
        "ss_num_epochs": str(math.ceil(m.get("total_steps", step) * settings.grad_accum / per_epoch)),
        "ss_epoch": str(math.ceil(step * settings.grad_accum / per_epoch)),
        "ss_steps": str(step),
        "ss_max_train_steps": str(m.get("total_steps", step)),
        "ss_batch_size_per_device": str(settings.batch_size),
        "ss_total_batch_size": str(m.get("global_batch", settings.batch_size)),
        "ss_gradient_checkpointing": str(settings.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(settings.grad_accum),
        "ss_lr_warmup_steps": str(settings.warmup_steps(m.get("total_steps", step))),
        "ss_lr_scheduler": settings.lr_scheduler,
        "ss_optimizer": optimizers.describe(settings.optimizer, settings.optimizer_args, settings.weight_decay),
        "ss_max_grad_norm": str(settings.max_grad_norm),
        "ss_mixed_precision": m.get("mixed_precision", settings.mixed_precision),  # auto resolved: no/fp16/bf16
        "ss_full_fp16": "False",
        "ss_resolution": str((data.resolution, data.resolution)),  # the training size; buckets: ss_bucket_info
        "ss_clip_skip": kohya_clip_skip(base.family, settings.clip_skip),
        "ss_max_token_length": str(settings.max_token_length) if settings.max_token_length != 75 else "None",
        "ss_cache_latents": str(not data.per_step),
        "ss_seed": str(settings.seed),
        "ss_noise_offset": str(settings.noise_offset),
        "ss_adaptive_noise_scale": str(settings.adaptive_noise_scale or None),
        "ss_min_snr_gamma": str(settings.min_snr_gamma or None),
        "ss_multires_noise_iterations": str(settings.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(settings.multires_noise_discount),
        "ss_ip_noise_gamma": str(settings.ip_noise_gamma or None),
        "ss_debiased_estimation": str(settings.debiased_estimation),
        "ss_noise_offset_random_strength": str(settings.noise_offset_random_strength),
        "ss_ip_noise_gamma_random_strength": str(settings.ip_noise_gamma_random_strength),
        # kohya's metadata has no place for these two; written under their flags' names
        "ss_v_pred_like_loss": str(settings.v_pred_like_loss or None),
        "ss_scale_v_pred_loss_like_noise_pred": str(settings.scale_v_pred_loss_like_noise_pred),
        "ss_loss_type": settings.loss_type,
        "ss_huber_schedule": settings.huber_schedule,
        "ss_huber_c": str(settings.huber_c),
        "ss_caption_dropout_rate": str(settings.caption_dropout),
        "ss_caption_tag_dropout_rate": str(settings.caption_tag_dropout),
        "ss_scale_weight_norms": str(settings.scale_weight_norms or None),
        "ss_caption_dropout_every_n_epochs": str(settings.caption_dropout_every_epochs),
        "ss_keep_tokens": str(settings.keep_tokens),
        "ss_shuffle_caption": str(settings.shuffle_captions),
        "ss_flip_aug": str(settings.flip),
        "ss_random_crop": str(settings.crop == "random"),
        "ss_color_aug": str(settings.color_aug),
        "ss_enable_bucket": str(settings.buckets),
        "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": list(s), "count": n}
                                                  for i, (s, n) in enumerate(sorted(sizes.items()))}}),
        "ss_dataset_dirs": json.dumps(data.scan.folders),
        "ss_tag_frequency": json.dumps(_tag_frequency(data.scan)),
        "ss_sd_model_name": Path(str(getattr(base, "name", ""))).name,
        # kohya's hashes of a single-file base (the old 8-hex one and the sha256), by which tools find the model;
        # a folder or built-in model has no file to hash
        **({"ss_sd_model_hash": old_model_hash(base.single_file), "ss_new_sd_model_hash": file_sha256(base.single_file)}
           if getattr(base, "single_file", None) else {}),
        "ss_training_comment": f"trained with sdtune (targets={settings.targets}, lora_dropout={settings.lora_dropout})",
        "ss_sdtune_preset": settings.preset,
        "ss_sdtune_version": __version__,  # (sd-scripts records its commit the same way)
        # kohya's record of a VAE given apart: its file name and sha256
        **({"ss_vae_name": base.vae_name, "ss_new_vae_hash": file_sha256(base.vae_file)}
           if getattr(base, "vae_file", None) else {}),
        LORA_SETTINGS_KEY: to_toml(settings),  # --config reads it back: the run that made this file
    }
    # kohya keeps these per subset in ss_datasets, which sdtune does not write (one folder is one dataset)
    meta |= {f"ss_{name}": getattr(settings, name) for name in (
        "keep_tokens_separator", "secondary_separator", "caption_prefix", "caption_suffix") if getattr(settings, name)}
    meta |= lycoris_network(settings, base.family) if is_lycoris(settings) else kohya_network(settings, base.family)
    meta |= sampling_metadata(base.family, base.scheduler.config)
    meta |= modelspec.metadata(base.family, base.scheduler.config, "lora", title=settings.name,
                               resolution=data.resolution, created=time.time(), clip_skip=meta["ss_clip_skip"],
                               timesteps=settings.timestep_range(len(base.scheduler.alphas_cumprod)),
                               trigger=settings.ti_token, user=settings.user_metadata())
    if settings.zero_terminal_snr:  # trained on the rescaled schedule, whatever the base samples with
        meta["ss_zero_terminal_snr"] = "True"
    if final:
        meta["ss_training_finished_at"] = str(time.time())
    return meta


def is_lycoris(settings: LoraSettings) -> bool:
    """Whether LyCORIS trains what the run trains (kohya's networks.lora trains a plain LoRA only: no algorithm
    switches, such as --tucker)."""
    return settings.algo != "lora" or settings.train_norm or any(getattr(settings, name) for name in ALGO_SWITCHES)


def lycoris_network(settings: LoraSettings, family) -> dict:
    """A LoHa, LoKr, DoRA, OFT, IA3 or full run's, or a LoRA's with LyCORIS's switches, network as LyCORIS records
    it: the ranks and alphas asked for (a LoKr layer whose w2 is whole has no rank of its own, which the file alone
    would call "Dynamic") and the algorithm's arguments."""
    algo = algos.get(settings.algo)
    name = "boft" if settings.oft_butterfly else algo.network_algo or "locon"
    args = {"algo": name, **algo.network_args, **_conv_args(settings)}  # DoRA: dora_wd
    if settings.algo == "lokr":
        args["factor"] = str(settings.lokr_factor)
    if algo.alpha_is_constraint:  # (LyCORIS's argument; the layers' alpha holds it too)
        args["constraint"] = str(float(settings.alpha))
    args |= {switch.lycoris: "True" for name, switch in ALGO_SWITCHES.items()
             if switch.lycoris and getattr(settings, name)}
    if settings.train_norm:
        args |= NormLayer.algo.network_args
    args |= _option_args(settings, family)
    if settings.rank_dropout:
        args["rank_dropout_scale"] = "True"  # sdtune's rows are scaled by 1/(1 - p), LyCORIS's option for it
    return {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(settings.rank),
            "ss_network_alpha": str(float(settings.alpha)), "ss_network_args": json.dumps(args)}


def kohya_network(settings: LoraSettings, family) -> dict:
    """A LoRA run's network arguments where kohya's ``networks.lora`` would have some beyond what the file's
    tensors say (the saved layout derives the conv ones): ``_option_args``."""
    options = _option_args(settings, family)
    return {"ss_network_args": json.dumps({**_conv_args(settings), **options})} if options else {}


KOHYA_ARG = {mine: theirs for theirs, mine in NETWORK_ARGS.items()}  # a setting's network_args name


def _option_args(settings: LoraSettings, family) -> dict:
    """The network arguments kohya and LyCORIS record for the run's options: the rank and module dropouts, LoRA+'s
    ratio, rsLoRA, --block-ranks/--block-alphas as kohya's block_dims/block_alphas, and --block-lr as kohya's
    down/mid/up_lr_weight (the factors of the input blocks, the middle one, the output ones). The text encoders'
    BASE has no place there; ss_sdtune_settings keeps the whole specs."""
    names = ("rank_dropout", "module_dropout", *LORAPLUS, "rs_lora")
    args = {KOHYA_ARG.get(name, name): str(getattr(settings, name)) for name in names if getattr(settings, name)}
    if settings.block_lr:
        weights = blocks.parse(settings.block_lr, family)
        for name, prefix in (("down_lr_weight", "IN"), ("mid_lr_weight", "M"), ("up_lr_weight", "OUT")):
            args[name] = ",".join(f"{w:g}" for block, w in weights.items() if block.startswith(prefix))
    for name, spec in (("block_dims", settings.block_ranks), ("block_alphas", settings.block_alphas)):
        if spec:  # kohya's one list over the UNet's blocks, input to output
            args[name] = ",".join(f"{v:g}" for block, v in blocks.parse(spec, family).items() if block != blocks.BASE)
    return args


def _conv_args(settings: LoraSettings) -> dict:
    conv_rank = _conv_rank(settings)
    return {"conv_dim": str(conv_rank), "conv_alpha": str(float(_conv_alpha(settings)))} if conv_rank else {}


def train_lora(base, settings: LoraSettings, callback=None) -> Path:
    """Train a LoRA; returns ``out/NAME.safetensors`` (kohya layout). The base is left unchanged."""
    settings.check()  # before the VAE is read
    loop.check_model(settings, base)
    loop.note_merged(base)
    unused = [f"--{n.replace('_', '-')}" for n in ("te_lr", "te2_lr") if getattr(settings, n) is not None] + \
        (["--te-steps"] if settings.te_steps else [])
    if unused and not settings.text_encoder:  # a kohya config may carry one for a UNet-only run: said, not refused
        note(f"{' and '.join(unused)}: for the text encoders, but this run trains the UNet only (add --text-encoder "
             f"to train them too); not used")
    elif settings.te2_lr is not None and len(base.family.text_encoders) < 2:
        note(f"--te2-lr: SDXL's second text encoder's learning rate, but {base.family.title} has one text encoder; "
             f"not used")
    # the folder is this run's from its first read of it through its report (a second run there is refused)
    with loop.holding(settings, "lora", base), vae_swapped(base, settings.vae):  # --vae: for this run only
        return _train_lora(base, settings, callback)


def _train_lora(base, settings: LoraSettings, callback=None) -> Path:
    """The run itself, with its VAE in place."""
    out = Path(settings.out)
    scan = scan_data(settings.data, default_caption=settings.default_caption, require_captions=True,
                     all_lines=settings.wildcards)
    report_skipped(scan)
    scan, held, held_out = validation.split(settings, scan, require_captions=True)
    loop.check_resume(base, settings, "lora", scan, validation.data_id(settings, held, held_out))  # before encoding
    plan = plan_layers(base, settings)  # its refusals (--exclude, --rank) before the images are encoded
    network = Network(base, settings, plan)  # (made, not yet in the model), --network-weights' refusals too
    data = training_set(base, settings, scan, templates=None)
    checks = validation.build(base, settings, held, [steady_caption(ex.caption or "", settings, ex.options) for ex in held.examples],
                              held_out)
    if settings.prior and settings.class_prompt:  # before anything is trained in: they show the base model
        loop.main_first(lambda: make_class_images(base, settings))  # one process draws them, for all
    prior = prior_set(base, settings, scan)
    lrs = {"unet": settings.lr}
    if settings.text_encoder:
        lrs |= {te.component: lr for (te, _, _), lr in zip(base.text_encoders(), text_lrs(settings, base))}
    groups = network.param_groups(lrs, loraplus_ratios(settings, lrs))
    for group in groups:  # --te-steps: the loop stops the text encoders' groups there (``stop_after``)
        if group["component"] != "unet":
            group["stop_after"] = settings.te_steps
    if settings.pivotal:
        check_captions([ex.caption for ex in scan.examples], settings.ti_token, settings.data)
    pivot = Pivot(base, settings) if settings.pivotal else None
    if pivot is not None:
        groups.append(pivot.param_group())

    def save(step: int, final: bool) -> list[Path]:
        lora = network.to_lora(settings.save_precision)
        meta = kohya_metadata(settings, base, data, job, step, final)
        if prior is not None:  # (as sd-scripts counts them: the images with their repeats, by folder)
            meta["ss_num_reg_images"] = str(len(prior))
            meta["ss_reg_dataset_dirs"] = json.dumps(prior.scan.folders)
        stem = settings.name if final else f"{settings.name}-step{step:06d}"
        paths = [out / f"{stem}.safetensors"]
        # pivotal tuning: the word inside the kohya file (A1111 loads both from it) and on its own beside it (for
        # diffusers, whose LoRA layout has no place for it: load_textual_inversion reads that file). The family
        # names the text encoders' kohya prefixes (SDXL: lora_te1_, lora_te2_) and ss_base_model_version.
        save_lora(pivot.bundled(lora) if pivot is not None else lora, paths[0], format="kohya", metadata=meta,
                  family=base.family)
        if pivot is not None:
            paths.append(pivot.save(out, step, final))
        if final and "diffusers" in settings.formats:
            paths.append(out / "diffusers" / "pytorch_lora_weights.safetensors")
            save_lora(lora, paths[-1], format="diffusers", family=base.family,
                      metadata=sampling_metadata(base.family, base.scheduler.config))
        return paths

    def state() -> dict:
        return {**network.state(), **(pivot.state() if pivot is not None else {})}

    def load_state(saved: dict) -> None:
        source = out / loop.STATE_FILE
        network.load_state(pivot.load_state(saved, source) if pivot is not None else saved, source)

    prompts = first_prompts(steady_caption(ex.caption or "", settings, ex.options) for ex in scan.examples)
    job = loop.Job(name="lora", param_groups=groups, state=state, load_state=load_state, save=save,
                   text_trainable=settings.text_encoder or pivot is not None, set_training=network.set_training,
                   sample_prompts=prompts, validation=checks,
                   expand=pivot.embeddings.expand if pivot is not None else (lambda prompt: prompt),
                   prior_data=prior, prior_weight=settings.prior_loss_weight)
    if settings.scale_weight_norms:
        job.after_step = lambda: network.max_norm(settings.scale_weight_norms)
    network.inject()
    if pivot is not None:
        pivot.install()
    try:
        record = loop.run(base, settings, job, data, callback)
    finally:
        network.remove()
        if pivot is not None:
            pivot.remove()  # the base as it was; the LoRA file brings the word back (base.loras.add)
    if settings.report and record.main:
        shown = samples.expand(settings.sample_prompts) or prompts
        report.write_report(base, settings, record, lambda: report.lora_grid(base, settings, record, shown[0]),
                            "Each checkpoint at strengths 0 to 1",
                            f"Prompt: {shown[0]}; seed {settings.seed}. Strength 0 is the base model.",
                            shown, len(scan.examples))
    return out / f"{settings.name}.safetensors"
