"""A full weight difference (LyCORIS ``full``): ΔW = diff, stored whole, and the bias's Δb (``diff_b``) where
the layer has a bias; no rank, and no alpha. ``FullLayer`` trains it (``--algo full``)."""

from __future__ import annotations

from .base import Algorithm, Io, kernel_of
from .delta_layer import DeltaLayer, zeros


class Diff(Algorithm):
    name = "diff"
    style = "lycoris-full"
    roles = {"diff": "diff", "diff_b": "bias"}
    optional = frozenset({"bias"})
    network_algo = "full"
    label = "full (diff)"
    uses_alpha = False

    def delta(self, t):
        return t["diff"]

    def io(self, t):
        d = t["diff"]
        return Io(d.shape[0], d[0].numel(), kernel_of(d))


class FullLayer(DeltaLayer):
    """LyCORIS full's trainable layer (native fine-tuning of the layer, kept apart as a file): the whole change of
    the weight, and of the bias where the layer has one, from zero (the base exactly), saved as ``diff`` and
    ``diff_b``. LyCORIS trains a copy of the weight itself and saves its difference, so its weight decay pulls
    the weight towards zero; here the change is the parameter, and decay pulls it towards the base model. No rank
    or alpha: ``--rank`` only decides which convolutions ``--targets all`` takes."""

    algo = Diff()
    linear_roles = (("diff",),)  # ΔW = diff: max-norm scales it whole (the bias's change stays)

    def shapes_and_inits(self, shape, rank, **options):
        made = {"diff": (shape, zeros)}
        if self.base.bias is not None:
            made["bias"] = ((shape[0],), zeros)
        return made


Diff.layer = FullLayer  # (the layer needs the algorithm first)
