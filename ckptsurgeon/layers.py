"""What library layers mean for surgery that changes a model's architecture (fold-bn,
bn-to-gn): a BatchNorm subclass may be more than a BatchNorm.

timm builds its convnets from ``BatchNormAct2d``: a ``nn.BatchNorm2d`` subclass (so that weights
trained with a separate BN load: same parameter names) whose forward is BN, then its own
``drop``, then its own ``act`` -- one module. Replacing it by a bare Identity (fold) or GroupNorm
(swap) would silently drop the activation. Imports torch only when called.
"""

from __future__ import annotations


def bn_kind(m) -> str:
    """'plain' (torch's BatchNorm, or a subclass that keeps its forward), 'norm-act' (BN, then the
    module's own ``drop`` and ``act`` submodules, timm's convention), else a reason the layer
    must be left alone."""
    from torch import nn

    cls = type(m)
    if cls.__module__.startswith("torch.nn") or cls.forward is nn.modules.batchnorm._BatchNorm.forward:
        return "plain"
    if isinstance(getattr(m, "act", None), nn.Module) and isinstance(getattr(m, "drop", None), nn.Module):
        return "norm-act"
    return f"{cls.__name__} computes its own forward"


_CLASSES: dict = {}


def _classes() -> dict:
    if not _CLASSES:  # defined on first use: importing the package does not import torch
        from torch import nn

        class ActAfter(nn.Module):
            """What is left of a norm-act layer once its BN is folded away: its drop, then its act,
            under the same names (an activation's own parameters, PReLU's, keep their keys)."""

            def __init__(self, drop, act):
                super().__init__()
                self.drop, self.act = drop, act

            def forward(self, x):
                return self.act(self.drop(x))

        class GroupNormAct(nn.GroupNorm):
            """GroupNorm, then the replaced norm-act layer's drop and act (timm's GroupNormAct)."""

            def __init__(self, num_groups, num_channels, eps, affine, drop, act):
                super().__init__(num_groups, num_channels, eps=eps, affine=affine)
                self.drop, self.act = drop, act

            def forward(self, x):
                return self.act(self.drop(super().forward(x)))

        _CLASSES.update(ActAfter=ActAfter, GroupNormAct=GroupNormAct)
    return _CLASSES


def without_norm(bn):
    """The module that replaces a folded BN: Identity, or a norm-act layer's drop + act."""
    from torch import nn

    return _classes()["ActAfter"](bn.drop, bn.act) if bn_kind(bn) == "norm-act" else nn.Identity()


def group_norm_for(bn, groups: int):
    """A GroupNorm replacing ``bn`` (γ/β not copied): a norm-act layer keeps its drop and act."""
    from torch import nn

    if bn_kind(bn) == "norm-act":
        return _classes()["GroupNormAct"](groups, bn.num_features, bn.eps, bn.affine, bn.drop, bn.act)
    return nn.GroupNorm(groups, bn.num_features, eps=bn.eps, affine=bn.affine)


def norm_output_module(m):
    """The submodule whose *input* is the normalised (affine) output before any activation, for
    a norm-act layer (its drop); None for a plain norm layer (its own output is)."""
    return m.drop if bn_kind(m) == "norm-act" or isinstance(m, _classes()["GroupNormAct"]) else None
