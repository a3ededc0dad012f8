"""Models from a configuration: the one place where a :class:`~pbip_core.config.Config` becomes networks."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data import DatasetInfo, load_info
from ..errors import DataError, PBIPError
from ..method.bank import PrototypeBank
from ..method.model import PBIP, ClassNet, ImgMatchNet
from ..nets.backbones import get_backbone
from ..nets.encoders import ImageEncoder, get_encoder
from .bank import load_bank
from .runtime import amp_dtype_name
from .step import encode_chunked

#: Words that mark a weight source as not pretrained (encoders: RANDOM_SOURCE, backbones: RANDOM_INIT).
_RANDOM_MARKERS = ("random", "RANDOM")


def build_classnet(model_cfg: Any, prototypes: torch.Tensor, backbone: nn.Module | None = None,
                   pretrained: bool | None = None) -> ClassNet:
    """ClassNet of ``model_cfg`` (a :class:`~pbip_core.config.ModelConfig`) on prototypes P (N, K, d).

    ``backbone`` defaults to ``model_cfg.backbone`` with pretrained weights when ``model_cfg.pretrained`` (or
    ``pretrained`` when given: a checkpoint about to be loaded needs no pretrained weights).
    """
    mc = model_cfg
    if backbone is None:
        backbone = get_backbone(mc.backbone, pretrained=mc.pretrained if pretrained is None else pretrained,
                                output_stride=mc.output_stride)
    return ClassNet(backbone, prototypes, mc.levels, mc.sim, mc.proj_hidden, mc.logit_scale, mc.learn_logit_scale,
                    mc.normalize_prototypes, mc.input_norm)


def build_model(cfg: Any, prototypes: torch.Tensor, encoder: ImageEncoder | None,
                backbone: nn.Module | None = None) -> PBIP:
    """The stage-1 model of a :class:`~pbip_core.config.Config`. ``encoder`` may be None when no FG/BG loss is on."""
    classnet = build_classnet(cfg.model, prototypes, backbone)
    matcher = None
    if (cfg.loss.fgs or cfg.loss.bgs) and encoder is not None:
        mc = cfg.model
        encode = functools.partial(encode_chunked, encoder, chunk=cfg.train.encoder_chunk)
        matcher = ImgMatchNet(encoder, mc.delta, mc.at, mc.threshold_scope, mc.fgbg, encode=encode,
                              cam_source=mc.cam_source, pairs=mc.pairs, separation=mc.separation,
                              space=mc.fgbg_space, threshold_map=mc.threshold_map)
    return PBIP(classnet, matcher)


def check_bank(bank: PrototypeBank, info: DatasetInfo, bank_path: str | Path) -> None:
    """DataError naming ``bank_path`` when the bank's classes do not fit the dataset ``info``."""
    if bank.n_classes != info.n_classes:
        raise DataError(f"{bank_path}: bank has {bank.n_classes} classes {bank.classes} but {info.root} has "
                        f"{info.n_classes} {list(info.classes)}; rebuild it with `pbip bank --data {info.root}`")


def prepare(cfg: Any, data_root: str | Path, bank_path: str | Path, device: str
            ) -> tuple[PBIP, PrototypeBank, DatasetInfo]:
    """Load the bank, the encoder (when a FG/BG loss is on) and build the model for ``cfg`` on ``device``."""
    info = load_info(data_root)
    bank = load_bank(bank_path)
    check_bank(bank, info, bank_path)
    encoder = None
    if cfg.loss.fgs or cfg.loss.bgs:
        enc_name = bank.encoder if bank.encoder not in ("unknown", "official-pickle") else cfg.bank.encoder
        encoder = get_encoder(enc_name, device=device, input_size=cfg.bank.encoder_size or None,
                              random_init=cfg.bank.random_init)
        if getattr(encoder, "dim", bank.dim) != bank.dim:
            raise PBIPError(f"encoder {enc_name!r} gives d={encoder.dim} features but the bank holds d={bank.dim}")
    model = build_model(cfg, bank.features, encoder).to(device)
    return model, bank, info


def weight_sources(model: PBIP, bank: PrototypeBank) -> dict[str, str]:
    """Where every weight of a stage-1 model came from: ``{"backbone": ..., "encoder": ..., "prototypes": ...}``
    (the encoder only when a FG/BG loss uses it; the prototypes: the encoder that built the bank)."""
    bb = model.classnet.backbone
    out = {"backbone": f"{getattr(bb, 'name', type(bb).__name__)}: {getattr(bb, 'pretrained_source', 'unknown')}"}
    if model.matcher is not None:
        enc = model.matcher.encoder
        out["encoder"] = f"{getattr(enc, 'name', type(enc).__name__)}: {getattr(enc, 'pretrained_source', 'unknown')}"
    src = bank.info.get("encoder_source") or bank.info.get("note") or "unknown source"
    out["prototypes"] = f"bank of {bank.encoder}: {src}"
    return out


def random_parts(sources: dict[str, str]) -> list[str]:
    """The parts of :func:`weight_sources` whose weights are random (not pretrained)."""
    return [k for k, v in sources.items() if any(m in v for m in _RANDOM_MARKERS)]


def run_description(model: PBIP, bank: PrototypeBank, cfg: Any, device: str, world: int = 1) -> dict[str, Any]:
    """What ``pbip train`` prints and records in ``run_info.json``: device, processes, dtype, the source of every
    weight, the parts with RANDOM WEIGHTS, and a one-paragraph ``summary``."""
    sources = weight_sources(model, bank)
    rand = random_parts(sources)
    dtype = amp_dtype_name(cfg.train.amp)
    summary = (f"=== stage 1 on {device} ({world} process{'es' if world > 1 else ''}), {dtype}; weights: "
               + "; ".join(f"{k} = {v}" for k, v in sources.items())
               + (f" -- RANDOM WEIGHTS in {', '.join(rand)}: numbers are not comparable to the paper's ===" if rand
                  else " ==="))
    return {"device": device, "world_size": world, "dtype": dtype, "amp": cfg.train.amp, "weights": sources,
            "random_weights": rand, "summary": summary}
