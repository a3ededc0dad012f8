"""``medclip``: MedCLIP's vision tower (Swin-T + Linear(768, 512)); a local checkpoint only (not on a model hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ...errors import ConfigError, WeightsError
from .. import weights as W
from .base import RANDOM_SOURCE, ImageEncoder, _tokens_to_grid, register_encoder

MEDCLIP_MEAN, MEDCLIP_STD = 0.5862785803043838, 0.27950088968644304   # MedCLIP constants.IMG_MEAN / IMG_STD


class SwinProjectionEncoder(ImageEncoder):
    """``medclip``: MedCLIP's vision model = SwinModel pooler output (mean of the final layer-normed tokens) ->
    ``projection_head`` Linear(768, 512, bias=False). ``pooled_encode`` with an all-ones mask equals ``encode``.

    Preprocessing: MedCLIP's scalar IMG_MEAN/IMG_STD on every RGB channel, 224x224 (MedCLIP's processor also
    pads to a square and centre-crops; here the image is resized as a whole).
    """

    def __init__(self, swin: nn.Module, proj: nn.Linear, pretrained_source: str, input_size: int = 224):
        super().__init__("medclip", proj.out_features, input_size, (MEDCLIP_MEAN,) * 3, (MEDCLIP_STD,) * 3,
                         pretrained_source)
        self.swin, self.proj = swin, proj

    def _features(self, xp: Tensor) -> Tensor:
        return _tokens_to_grid(self.swin(pixel_values=xp).last_hidden_state)

    def head(self, pooled: Tensor) -> Tensor:
        return self.proj(pooled)

    def encode(self, x: Tensor) -> Tensor:
        return self.proj(self.swin(pixel_values=self.preprocess(x)).pooler_output)

def swin_tiny_config(**overrides):
    """SwinConfig of microsoft/swin-tiny-patch4-window7-224 (MedCLIP's VIT_TYPE), built offline."""
    from transformers import SwinConfig

    kw = dict(image_size=224, patch_size=4, num_channels=3, embed_dim=96, depths=[2, 2, 6, 2],
              num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0, qkv_bias=True, hidden_act="gelu",
              layer_norm_eps=1e-5, drop_path_rate=0.1)
    kw.update(overrides)
    return SwinConfig(**kw)

def load_medclip_state(path: Path) -> dict[str, Tensor]:
    """Read a MedCLIP checkpoint (a directory with pytorch_model.bin, or the file itself)."""
    f = path / "pytorch_model.bin" if path.is_dir() else path
    if not f.exists():
        raise WeightsError(f"{f}: no MedCLIP checkpoint here ({W.WEIGHTS['medclip'].manifest_ref}); "
                           f"{W.WEIGHTS['medclip'].how_to_provide()}")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{f}: unreadable MedCLIP checkpoint ({type(e).__name__}: {e})") from None

def medclip_vision_from_state(state: dict[str, Tensor], config=None, source: str = "") -> SwinProjectionEncoder:
    """Build the MedCLIP vision tower from a MedCLIP state dict.

    MedCLIP keys: ``vision_model.model.<SwinModel key>`` (transformers 4.x names, renamed to the installed
    version's by transformers' own checkpoint conversion) and ``vision_model.projection_head.weight`` (512, 768).
    The text tower and ``logit_scale`` are ignored. Missing or mismatched Swin keys raise WeightsError.
    """
    from transformers import SwinModel

    config = config or swin_tiny_config()
    prefix = "vision_model.model."
    swin_sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    proj_w = state.get("vision_model.projection_head.weight")
    if not swin_sd or proj_w is None:
        raise WeightsError(f"{source or 'MedCLIP state dict'}: no 'vision_model.model.*' / "
                           f"'vision_model.projection_head.weight' keys: not a MedCLIP checkpoint")
    swin, info = SwinModel.from_pretrained(None, config=config, state_dict=swin_sd, output_loading_info=True)
    bad = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"])
    if bad:
        raise WeightsError(f"{source or 'MedCLIP state dict'}: Swin weights do not fit the swin-tiny architecture "
                           f"(missing/mismatched: {bad[:5]}{' ...' if len(bad) > 5 else ''})")
    proj = nn.Linear(proj_w.shape[1], proj_w.shape[0], bias=False)
    with torch.no_grad():
        proj.weight.copy_(proj_w)
    return SwinProjectionEncoder(swin, proj, source)


@register_encoder("medclip")
def _build_medclip(weights, random_init, input_size):
    if input_size not in (None, 224):
        raise ConfigError("encoder 'medclip' works at 224x224 only (Swin-T window 7)")
    if random_init:
        from transformers import SwinModel

        return SwinProjectionEncoder(SwinModel(swin_tiny_config()), nn.Linear(768, 512, bias=False), RANDOM_SOURCE)
    path = W.local_weights("medclip", weights)
    if path is None:
        entry = W.WEIGHTS["medclip"]
        raise WeightsError(f"{entry.manifest_ref} not found: MedCLIP weights are not on a model hub; download the "
                           f"MedCLIP-ViT checkpoint as the MedCLIP README describes (github.com/RyanWangZf/MedCLIP) "
                           f"and set {entry.env_var}=DIR (the folder with pytorch_model.bin) or pass weights=DIR")
    return medclip_vision_from_state(load_medclip_state(path), source=f"MedCLIP checkpoint {path}")
