"""The networks, by config name (`config.model.type`): NHWC Flax modules called as
`module(x, noise_labels, class_labels, augment_labels, train=...)`."""
from __future__ import annotations


def _networks():
    """Config name -> (Flax module, check(img_resolution, **kwargs): a ValueError naming the field)."""
    from jaxdiff.nets import adm, convnext_unet, ddpmpp, dit, uvit
    return {'SongUNet': (ddpmpp.SongUNet, _check_group_norm), 'DhariwalUNet': (adm.DhariwalUNet, _check_group_norm),
            'convnext_unet': (convnext_unet.ConvNeXtUNet, convnext_unet.check), 'uvit': (uvit.UViT, uvit.check),
            'dit': (dit.DiT, dit.check)}


NAMES = ('SongUNet', 'DhariwalUNet', 'convnext_unet', 'uvit', 'dit')


def build(model_type: str, *, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
          dtype=None, **kwargs):
    """The module `model_type` with its keyword arguments (lists become tuples), after the network's
    own checks; a ValueError naming the type or the argument otherwise."""
    networks = _networks()
    if model_type not in networks:
        raise ValueError(f'Unsupported model type {model_type!r}; expected one of {tuple(networks)}')
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    module, check = networks[model_type]
    check(img_resolution, **kwargs)
    return module(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
                  label_dim=label_dim, dtype=dtype, **kwargs)


def _check_group_norm(img_resolution, model_channels=None, channel_mult=(), **_):
    check_group_norm_channels(model_channels, channel_mult)


def check_group_norm_channels(model_channels, channel_mult) -> None:
    """SongUNet/DhariwalUNet's GroupNorm needs channel counts divisible by its group count min(32, C // 4)."""
    for mult in channel_mult or ():
        c = model_channels * mult
        groups = min(32, c // 4)
        if groups == 0 or c % groups:
            raise ValueError(f'model_channels * channel_mult = {c} channels cannot be split into {groups} '
                             'normalisation groups; use a multiple of 32 (or of 4 below 128)')
