"""``clip`` and ``plip``: CLIP ViT-B/32 image towers (transformers), and their text towers for text prompts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import ConfigError, PBIPError
from .. import weights as W
from .base import RANDOM_SOURCE, ImageEncoder, _processor_mean_std, _tokens_to_grid, register_encoder

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)

OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

class CLIPImageEncoder(ImageEncoder):
    """``clip`` / ``plip``: transformers CLIPVisionModelWithProjection; ``encode`` = ``image_embeds``
    (visual_projection(post_layernorm(CLS))). ``feature_map`` = patch tokens (without CLS) as a grid and ``head`` =
    visual_projection(post_layernorm(.)), so ``pooled_encode`` uses mean patch tokens where CLIP uses CLS.
    """

    def __init__(self, name: str, model: nn.Module, pretrained_source: str, mean=OPENAI_CLIP_MEAN,
                 std=OPENAI_CLIP_STD, input_size: int | None = None):
        native = model.config.image_size
        super().__init__(name, model.config.projection_dim, input_size or native, mean, std, pretrained_source)
        self.model = model
        self._interp = self.input_size != native

    def _features(self, xp: Tensor) -> Tensor:
        out = self.model.vision_model(pixel_values=xp, interpolate_pos_encoding=self._interp)
        return _tokens_to_grid(out.last_hidden_state[:, 1:])

    def head(self, pooled: Tensor) -> Tensor:
        return self.model.visual_projection(self.model.vision_model.post_layernorm(pooled))

    def encode(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=self.preprocess(x), interpolate_pos_encoding=self._interp).image_embeds

def _build_clip(name: str):
    def build(weights, random_init, input_size):
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if random_init:
            cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, image_size=224, patch_size=32, projection_dim=512)
            return CLIPImageEncoder(name, CLIPVisionModelWithProjection(cfg), RANDOM_SOURCE, input_size=input_size)
        model = W.load_hf_pretrained(name, CLIPVisionModelWithProjection.from_pretrained, weights)
        path = W.local_weights(name, weights)
        mean, std = _processor_mean_std(path, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        src = str(path) if path else W.WEIGHTS[name].hub_id
        return CLIPImageEncoder(name, model, f"{W.WEIGHTS[name].description} ({src})", mean, std, input_size)
    return build


register_encoder("plip")(_build_clip("plip"))
register_encoder("clip")(_build_clip("clip"))


class CLIPTextEncoder(nn.Module):
    """CLIPModel text tower + tokenizer: ``encode_text(list[str]) -> (T, d)`` (``get_text_features``)."""

    def __init__(self, name: str, model: nn.Module, tokenizer):
        super().__init__()
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.dim = model.config.projection_dim
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        tok = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(device)
        out = self.model.get_text_features(**tok)
        return out if isinstance(out, Tensor) else out.pooler_output

def get_text_encoder(name: str, weights: str | None = None) -> CLIPTextEncoder:
    """Text tower for ``clip`` / ``plip`` (same weights entry as the image encoder)."""
    if name == "medclip":
        raise PBIPError("MedCLIP text encoder is not implemented in pbip_core (the paper's method uses image "
                        "prototypes only); use 'clip' or 'plip' for text features")
    if name not in ("clip", "plip"):
        raise ConfigError(f"no text encoder for {name!r}; choose 'clip' or 'plip'")
    from transformers import AutoTokenizer, CLIPModel

    model = W.load_hf_pretrained(name, CLIPModel.from_pretrained, weights)
    tokenizer = W.load_hf_pretrained(name, AutoTokenizer.from_pretrained, weights)
    return CLIPTextEncoder(name, model, tokenizer)
