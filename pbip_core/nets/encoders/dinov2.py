"""``dinov2``: DINOv2 ViT-B/14 (transformers), CLS-token embedding."""

from __future__ import annotations

from torch import Tensor, nn

from .. import weights as W
from .base import IMAGENET_MEAN, IMAGENET_STD, RANDOM_SOURCE, ImageEncoder, _processor_mean_std, _tokens_to_grid, register_encoder


class Dinov2Encoder(ImageEncoder):
    """``dinov2``: transformers Dinov2Model; ``encode`` = pooler output (layer-normed CLS token, d = 768).
    ``feature_map`` = layer-normed patch tokens as a grid; ``head`` = identity (mean patch token, not CLS).
    """

    def __init__(self, model: nn.Module, pretrained_source: str, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 input_size: int = 224):
        super().__init__("dinov2", model.config.hidden_size, input_size, mean, std, pretrained_source)
        self.model = model
        self._skip = 1 + getattr(model.config, "num_register_tokens", 0)

    def _features(self, xp: Tensor) -> Tensor:
        return _tokens_to_grid(self.model(pixel_values=xp).last_hidden_state[:, self._skip:])

    def encode(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=self.preprocess(x)).pooler_output


@register_encoder("dinov2")
def _build_dinov2(weights, random_init, input_size):
    from transformers import Dinov2Config, Dinov2Model

    size = input_size or 224
    if random_init:
        return Dinov2Encoder(Dinov2Model(Dinov2Config(image_size=518, patch_size=14)), RANDOM_SOURCE,
                             input_size=size)
    model = W.load_hf_pretrained("dinov2", Dinov2Model.from_pretrained, weights)
    path = W.local_weights("dinov2", weights)
    mean, std = _processor_mean_std(path, IMAGENET_MEAN, IMAGENET_STD)
    src = str(path) if path else W.WEIGHTS["dinov2"].hub_id
    return Dinov2Encoder(model, f"{W.WEIGHTS['dinov2'].description} ({src})", mean, std, size)
