"""``mit_b1``: the SegFormer MiT-B1 encoder (transformers ``SegformerModel``), the paper's ClassNet backbone."""

from __future__ import annotations

from torch import Tensor, nn

from .. import weights as W
from ...errors import ConfigError
from .base import IMAGENET_MEAN, IMAGENET_STD, RANDOM_INIT, Backbone, register_backbone


class SegformerBackbone(Backbone):
    """transformers SegformerModel (MiT encoder): the four stage outputs (``output_hidden_states``)."""

    def __init__(self, model: nn.Module, pretrained_source: str, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__("mit_b1", model.config.hidden_sizes, mean, std, pretrained_source)
        self.model = model

    def _stages(self, xn: Tensor) -> list[Tensor]:
        return list(self.model(pixel_values=xn, output_hidden_states=True).hidden_states)

def mit_strides(output_stride: int) -> list[int]:
    """Patch-embedding strides of the four MiT stages: [4, 2, 2, 2] (output stride 32) or [4, 2, 2, 1] (16: the
    official PBIP code's ``stride: [4, 2, 2, 1]``, the last stage at H/16; the weights are the same)."""
    if output_stride not in (16, 32):
        raise ConfigError(f"backbone 'mit_b1' supports output_stride 32 or 16 (got {output_stride})")
    return [4, 2, 2, 2] if output_stride == 32 else [4, 2, 2, 1]


def mit_b1_config(output_stride: int = 32):
    """SegformerConfig of nvidia/mit-b1, built offline."""
    from transformers import SegformerConfig

    return SegformerConfig(num_channels=3, num_encoder_blocks=4, depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1],
                           hidden_sizes=[64, 128, 320, 512], patch_sizes=[7, 3, 3, 3], strides=mit_strides(output_stride),
                           num_attention_heads=[1, 2, 5, 8], mlp_ratios=[4, 4, 4, 4], hidden_act="gelu",
                           drop_path_rate=0.1, layer_norm_eps=1e-6)


@register_backbone("mit_b1")
def _build_mit_b1(pretrained: bool, weights, output_stride: int) -> Backbone:
    from transformers import SegformerModel

    strides = mit_strides(output_stride)
    if not pretrained:
        return SegformerBackbone(SegformerModel(mit_b1_config(output_stride)), RANDOM_INIT)
    model = W.load_hf_pretrained("mit_b1", SegformerModel.from_pretrained, weights, strides=strides)
    path = W.local_weights("mit_b1", weights)
    return SegformerBackbone(model, f"{W.WEIGHTS['mit_b1'].description} ({path or W.WEIGHTS['mit_b1'].hub_id})")
