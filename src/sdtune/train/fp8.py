"""--fp8-base (kohya's --fp8_base): the frozen linear and convolution weights of the UNet and the text encoders
stored in 8-bit floats (e4m3) while a run trains, each cast to its layer's dtype only while it computes; with
--fp8-base-unet (kohya's --fp8_base_unet) the UNet's alone. An SDXL UNet then holds 2.6 GB of weights instead of
5.1 GB in fp16, its two text encoders about 0.9 instead of 1.6. The run trains around the base rounded to 8 bits;
the LoRA's files are applied to the real W0 afterwards, as kohya's are. The token embeddings stay as they are, as
in kohya's (no linear layer, and TI trains a row of them).

The layers are replaced by fp8 twins (``Fp8Layer``) for the run, and the originals put back after it; on a GPU the
originals wait in the CPU's memory meanwhile (which is where the saving is: on the CPU they stay beside their twins).
A twin keeps its 8-bit weight, not the cast one, for the backward pass, and casts it again there: the saving holds
through the whole step, with or without gradient checkpointing."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..safeio import SdtuneError

FP8 = torch.float8_e4m3fn
LARGEST = torch.finfo(FP8).max  # 448: past it a weight would not round but break


class _Cast(torch.autograd.Function):
    """A linear or convolution layer whose weight is stored in fp8: cast for the product, and again for the input's
    gradient (the weight itself is frozen: no gradient)."""

    @staticmethod
    def forward(ctx, x, weight8, bias, dtype, conv):
        ctx.save_for_backward(weight8)
        ctx.conv, ctx.shape = conv, x.shape
        weight = weight8.to(dtype)
        if conv is None:
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, *conv)

    @staticmethod
    def backward(ctx, grad):
        (weight8,) = ctx.saved_tensors
        weight = weight8.to(grad.dtype)
        if ctx.conv is None:
            return grad @ weight, None, None, None, None
        return torch.nn.grad.conv2d_input(ctx.shape, weight, grad, *ctx.conv), None, None, None, None


class Fp8Layer(nn.Module):
    """A frozen nn.Linear or nn.Conv2d with its weight in fp8 (a buffer, so that diffusers still reads the model's
    dtype from its other parameters), its bias as it was; ``weight`` reads as the layer's did (LoHa, LoKr and DoRA
    layers compute with it, cast)."""

    def __init__(self, layer: nn.Linear | nn.Conv2d):
        super().__init__()
        self.register_buffer("weight", layer.weight.detach().to(FP8), persistent=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.dtype = layer.weight.dtype
        self.conv = None
        if isinstance(layer, nn.Conv2d):  # (kept as the layer's: LoHa, LoKr and DoRA layers read them too)
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
            self.conv = (layer.stride, layer.padding, layer.dilation, layer.groups)

    def forward(self, x):
        return _Cast.apply(x, self.weight, self.bias, self.dtype, self.conv)


def _convertible(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros"
                                            and not isinstance(layer.padding, str))


def models(base, whole: bool, unet_only: bool) -> dict[str, nn.Module]:
    """The models of ``base`` a run keeps in fp8, by the name its refusals give them: the UNet with either switch,
    the text encoders too with --fp8-base alone (``whole``)."""
    if not (whole or unet_only):
        return {}
    chosen = {"the UNet": base.unet}
    if not unet_only:
        chosen |= {f"the {te.component}": model for te, model, _ in base.text_encoders()}
    return chosen


def flag(settings) -> str:
    """The switch a run's fp8 notes and refusals name."""
    return "--fp8-base-unet" if settings.fp8_base_unet else "--fp8-base"


def store_in_fp8(model: nn.Module, trainable: set[int], where: str = "the UNet",
                 switch: str = "--fp8-base") -> Callable[[], None]:
    """Each linear and convolution layer of ``model`` whose weight is not ``trainable`` (by id) replaced by an
    ``Fp8Layer``; returns the undo, which puts the originals back where they were."""
    swaps = []

    def undo() -> None:
        for parent, name, original, device in reversed(swaps):
            original.to(device)
            setattr(parent, name, original)

    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not _convertible(child) or id(child.weight) in trainable:
                    continue
                if child.weight.detach().abs().max() > LARGEST:
                    raise SdtuneError(f"{switch}: {where}'s {name} layer holds weights past fp8's largest value "
                                      f"({LARGEST:g}); train without {switch}")
                device = child.weight.device
                twin = Fp8Layer(child)
                if device.type != "cpu":
                    child.to("cpu")
                setattr(parent, name, twin)
                swaps.append((parent, name, child, device))
    except BaseException:
        undo()
        raise
    return undo


def names_in_fp8(model: nn.Module) -> list[str]:
    """The names of ``model``'s tensors stored in fp8 (the twins' weights), which DDP is told to leave alone."""
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.dtype == FP8]
