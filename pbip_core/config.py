"""One configuration tree for every stage, with named profiles and method presets.

A run is described by :class:`Config`: nested dataclasses whose dotted paths are the keys of
``--set key=value`` (``train.lr=1e-5``, ``model.sim=false``). Three named profiles fix the scale:

* ``smoke``: tests and CI; a few minutes on 2 CPU cores, tiny images and one epoch.
* ``demo``: the embedded default; meaningful on the synthetic dataset in well under 30 minutes on 2 CPU cores.
* ``paper``: the paper's hyperparameters (sec. 4.1) for a GPU and the real datasets.

Method presets (``--set method=...``) switch the method on top of a profile:

* ``pbip``: the paper (default).
* ``cam``: baseline CAM; a 1x1-conv head on the same backbone, L_CLS only, same schedule.
* ``official``: the public code's behaviour (QingchenTang/PBIP, BCSS-WSSS stage 1), each difference behind its own
  key; ``pbip_core.book.tables.DIFFERENCES`` lists them with the official file and function, chapter 09 measures them.

Seed rule: ``bank.seed_from_train=true`` sets ``bank.seed`` to ``train.seed`` (applied last, after every override), so
a grid over seeds draws Figure 4's random sub-banks anew per run, as the paper's ten draws; the default keeps the bank
fixed while the seeds vary the training.

Resolution order: profile defaults -> YAML file (``--config``) -> ``method`` preset -> ``--set`` overrides. A preset
only changes the keys it names, so ``--set method=official --set train.lr=1e-5`` keeps the override.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml

from .errors import ConfigError
from .io import atomic_write_text

Profile = Literal["smoke", "demo", "paper"]
Method = Literal["pbip", "cam", "official"]
PROFILES: tuple[str, ...] = typing.get_args(Profile)
METHODS: tuple[str, ...] = typing.get_args(Method)
#: ``train.device`` / ``--device``: availability is checked where the device is resolved (engine.runtime).
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_CHOICES = "auto | cpu | cuda | cuda:N | mps"


@dataclass
class DataConfig:
    root: str = "data/synth"          # dataset folder (docs/DESIGN.md format)
    image_size: int = 224             # images are resized to this square size for training
    augment: bool = True              # random flips + rot90: a reading (the paper names no augmentation; the official
                                      # code's albumentations HorizontalFlip + VerticalFlip + RandomRotate90)
    num_workers: int = 0              # DataLoader worker processes per training process (paper profile: 8)
    max_train: int = 0                # 0 = all training images; >0 caps them (smoke runs)


@dataclass
class BankConfig:
    encoder: str = "pathmnist-densenet121"   # name in encoders.ENCODERS
    encoder_size: int = 0             # square input size of the encoder (0 = its native size, e.g. 224); the bank and
                                      # the FG/BG images use the same size so prototypes and features are comparable
    k: int = 3                        # K clusters per class (sec. 3.2)
    nk: int = 100                     # N_K images kept per cluster
    white_threshold: float = 0.5      # drop images whose white-pixel share is above this
    selection: Literal["cluster", "random", "centroid"] = "cluster"   # paper | Fig. 4 | official: centres, all images
    kmeans_iters: int = 100
    kmeans_restarts: int = 5
    seed: int = 0                     # K-means seeds (seed + n) and random sub-banks (seed * 1000 + n)
    seed_from_train: bool = False     # True: bank.seed := train.seed (Fig. 4's random sub-banks drawn per run seed)
    batch_size: int = 32
    # Build the encoder's architecture with random weights instead of loading pretrained ones: tests of the paper
    # path (MedCLIP's architecture) on machines without the weights. Every output says "RANDOM WEIGHTS".
    random_init: bool = False


@dataclass
class ModelConfig:
    backbone: str = "mit_b1"          # mit_b1 | resnet18 | resnet50 | efficientnet_lite0 | ...
    pretrained: bool = True           # load the backbone's pretrained weights (error if unavailable)
    levels: tuple[int, ...] = (1, 2, 3)   # backbone stages used as F_i: paper sec. 3.3, i = 1..3 at H/2^(i+1); official: 1-4
    sim: bool = True                  # eq. 2 cosine SIM head; False = 1x1 conv head (Table 5)
    at: bool = True                   # adaptive threshold (eq. 4); False = b = 1 everywhere (Table 5)
    delta: float = 0.15               # eq. 4
    # eq. 4: "class" = tau per image and class on the min-max scaled map (paper); "global" = tau = delta x the max
    # over all channels of the un-normalised map M' (official: MaskAdapter_DynamicThreshold on the raw CAM logits)
    threshold_scope: Literal["class", "global"] = "class"
    # eq. 4 on which map (a reading; the paper writes tau = delta max(M) with M undefined): "fused" = M' of eq. 3 (the
    # sum of cosine maps), tau = delta max M' | "minmax" = M = min-max(M'), tau = delta (with delta = 0.15 it keeps
    # ~97 % of the pixels: the adaptive threshold does almost nothing and X_BG is nearly black; chapter 04)
    threshold_map: Literal["fused", "minmax"] = "fused"
    proj_hidden: int = 0              # hidden width of the prototype MLP; 0 = same as the level's C_i (official: 256 =
                                      # 0.5 x the 512-d prototypes, AdaptiveLayer n_ratio)
    logit_scale: float = 10.0         # s in sigmoid(s * GAP(M_i)): a reading (eq. 7 gives none; model.py, losses.py);
                                      # official: learnable per level, initialised to 1/0.07
    learn_logit_scale: bool = False
    normalize_prototypes: bool = True # official code leaves projected prototypes unnormalised
    fgbg: Literal["exact", "pooled"] = "exact"   # encode X_FG and X_BG (paper) | pool the image's features (approx.)
    output_stride: int = 32           # stride of the last backbone stage: 32 (strides 4, 8, 16, 32) | 16 (official:
                                      # MiT-B1 built with stride [4, 2, 2, 1], so F_4 stays at H/16)
    # Backbone input: "backbone" = RGB with the backbone's own mean/std (ImageNet) | "official" = BGR (cv2.imread)
    # normalised with the official code's mean (0.668, 0.478, 0.706) / std (0.174, 0.226, 0.198), in BGR order
    input_norm: Literal["backbone", "official"] = "backbone"
    # FG/BG maps of eq. 3-5: "all" = M' = sum over the used levels (eq. 3) | "last" = the last used level's CAM only
    # (official: FeatureExtractor.process_batch(inputs, cam4, ...); cam1-3 are detached in ClsNetwork.forward)
    cam_source: Literal["all", "last"] = "all"
    # which (image, class) pairs get FG/BG images: "class" = every positive class, its map averaged over the K
    # prototypes (eq. 2) | "subclass" = per sub-class (prototype) map, the sub-classes whose last-level logit exceeds
    # the mean of their class's K logits, of positive classes (official: cls4_bir = (cls4 > cls4_expand) * labels)
    pairs: Literal["class", "subclass"] = "class"
    # eq. 5: "paper" = X_FG = b M X, X_BG = (1 - b)(1 - M) X with M min-max scaled | "official" = FG = CAM * X and
    # BG = (1 - CAM) * X on the raw CAM logits, min-max scaled per RGB channel, then masked by b and 1 - b
    # (FeatureExtractor.extract_features + get_masked_features)
    separation: Literal["paper", "official"] = "paper"
    # where L_FGS / L_BGS compare: "projected" = MLP_i(phi(X_FG)) with P_i = MLP_i(P) at every level (this book's
    # reading of eq. 10, 12) | "encoder" = phi(X_FG) with the raw prototypes P, once (official: pair_features(...,
    # l_fea, ...) with the unprojected prototype file)
    fgbg_space: Literal["projected", "encoder"] = "projected"


@dataclass
class LossConfig:
    alpha: float = 1.0                # eq. 6
    beta: float = 0.5
    theta1: float = 1.0               # eq. 13
    theta2: float = 0.5
    tau: float = 1.0                  # temperature of eq. 9, 11
    fgs: bool = True                  # switch L_FGS on/off (Table 2)
    bgs: bool = True                  # switch L_BGS on/off (Table 2)
    cls: bool = True
    cls_level_weights: tuple[float, ...] = ()   # () = 1 for every level (eq. 8); official: 0, 0.1, 1, 1.5 (l1-l4)
    cam_reg: float = 0.0              # weight of mean(last level's CAM logits) inside beta's bracket (official: 0.0005,
                                      # loss = cls + l5 * (fg + bg + 0.0005 * mean(cam4)))
    # eq. 9-12 reduction: "pair" = -log(e^pos / (e^pos + e^neg)) per pair with summed / averaged similarities, mean over
    # pairs (eq. 9-12) | "batch" = one ratio for the batch: exp of every prototype similarity, summed over the pair's
    # prototypes and over the batch before the log (official: InfoNCELossFG / InfoNCELossBG in utils/contrast_loss.py)
    nce: Literal["pair", "batch"] = "pair"


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 10
    batch_size: int = 10
    lr: float = 1e-5
    weight_decay: float = 0.003
    schedule: Literal["constant", "linear", "poly"] = "constant"   # a reading (sec. 4.1 names none); official: linear
                                                                   # decay (PolyWarmupAdamW, power 1, no warm-up)
    warmup_steps: int = 0
    device: str = "auto"              # "auto" = cuda if available else cpu
    allow_cpu: bool = False           # the paper profile refuses to run on a CPU unless this is true (tests, tiny data)
    dist_timeout_min: float = 60.0    # torch.distributed process-group timeout (minutes): a stuck rank fails, not hangs
    # FG/BG images per encoder call in the exact chunked step (0 = all 2P in one call). Same mathematics whatever
    # the value; 8 measured fastest on CPU (benchmarks/README.md) and caps the encoder's live graph at 8 images.
    encoder_chunk: int = 8
    # mixed precision for stage 1 and stage 2: bf16 autocast | fp16 autocast with a gradient scaler | off (fp32).
    # Applied on the device the run uses (slow on a CPU without bf16 units: the paper profile's CPU runs are tests).
    # The paper profile's bf16 is this book's choice, not the paper's; the official code uses fp16 with a GradScaler.
    amp: Literal["bf16", "fp16", "off"] = "off"
    val_every: int = 1                # validate pseudo masks every N epochs (0 = never)
    max_val: int = 0                  # cap validation images (0 = all)
    log_every: int = 10
    channels_last: bool = False


@dataclass
class PseudoConfig:
    level_weights: tuple[float, ...] = ()   # () = equal weights over the used levels
    # val/test: the classes the argmax may choose: present in the GT mask (a reading: the paper is silent; the official
    # code's BCSSTestDataset derives them from the mask) | the classifier's own prediction. Read by stage-1
    # validation, `pbip pseudo` (default of --labels) and the runner's pipeline.
    labels: Literal["gt", "predicted"] = "gt"
    predict_threshold: float = 0.5    # image-label threshold for labels="predicted"
    white_background: bool = True    # a reading (the paper names no background rule): white pixels -> background_index
    white_threshold: float = 0.85     # a pixel is white if min(R,G,B)/255 > this (after a 3x3 median)
    # merge of the K sub-maps of a class: "mean" (eq. 2) | "softmax" = sum_k softmax_k(s M_k) M_k per pixel (official
    # merge_test "max": merge_subclass_cams_to_parent)
    merge: Literal["mean", "softmax"] = "mean"
    # per-level CAM before fusion: "none" | "relu_minmax" = ReLU, min-max per channel, absent classes zeroed
    # (official: utils/validate.py get_seg_label)
    cam_norm: Literal["none", "relu_minmax"] = "none"
    tta: bool = False                 # val/test: mean over horizontal flip x input scaling 0.9/1.0/1.1 (official: ttach in
                                      # validate(); the train-split masks for stage 2 are made without it)
    # stage-1 weights scored on val/test by the pipeline: the best validation epoch (this book) | the last
    # iteration's (official: test runs on the model after the loop; best_cam.pth only makes the train CAMs)
    test_checkpoint: Literal["best", "last"] = "best"


@dataclass
class Stage2Config:
    backbone: str = "resnet101"       # resnet101 (paper: DeepLab-v2) | resnet18 / efficientnet_lite0 (CPU)
    pretrained: bool = True
    epochs: int = 20
    batch_size: int = 8
    lr: float = 2.5e-4                # DeepLab-v2 defaults (Chen et al. 2017); head gets 10x
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9                # poly schedule
    image_size: int = 224
    ms_flip: bool = False             # multi-scale + flip inference
    output_stride: int = 8            # DeepLab-v2: 8 (dilated stages 3-4); 16 halves the cost on a CPU
    seed: int = 0


# keys that schedule the same computation differently, or say where it runs (not part of a run's identity). The
# dataset folder (data.root) is a path: a run's identity holds the dataset's content identity instead
# (pbip_core.experiments.identity), so the same data under another path or on another machine is the same run.
_UNHASHED = ("train.device", "data.num_workers", "train.log_every", "train.encoder_chunk", "data.root",
             "train.allow_cpu", "train.dist_timeout_min")


@dataclass
class Config:
    profile: Profile = "demo"
    method: Method = "pbip"
    data: DataConfig = field(default_factory=DataConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    # ------------------------------------------------------------------ dict / hash helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. ``{"train.lr": 1e-5, ...}``."""
        return dict(_flatten(self.to_dict()))

    def hash(self, exclude: Iterable[str] = _UNHASHED) -> str:
        """Content hash of the configuration (used to skip finished runs). Keys that only say how the same
        computation is scheduled (device, data workers, logging, encoder chunk size) are left out."""
        flat = {k: v for k, v in self.flat().items() if k not in set(exclude)}
        blob = json.dumps(flat, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def stage1_hash(self) -> str:
        """Hash of the keys stage 1 depends on (everything but ``stage2.*``): a stage-1 run can be resumed or reused
        by configurations that differ only in stage 2."""
        return self.hash(exclude=(*_UNHASHED, *[k for k in self.flat() if k.startswith("stage2.")]))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(_to_yaml(self.to_dict()), sort_keys=False))


# ---------------------------------------------------------------------- profiles and presets
_PROFILE_OVERRIDES: dict[str, dict[str, Any]] = {
    # CI: minutes on 2 cores. Tiny images, a light pretrained CNN backbone and encoder that ship in PyPI packages.
    "smoke": {
        "data.image_size": 64, "data.max_train": 48, "data.augment": False,
        "bank.encoder": "imagenet-efficientnet-lite0", "bank.k": 2, "bank.nk": 5, "bank.kmeans_restarts": 2,
        "bank.encoder_size": 64,
        "model.backbone": "efficientnet_lite0", "model.levels": (1, 2, 3),
        "train.epochs": 1, "train.batch_size": 8, "train.lr": 1e-4, "train.max_val": 8, "train.log_every": 1,
        "stage2.backbone": "resnet18", "stage2.pretrained": False, "stage2.epochs": 1, "stage2.batch_size": 8,
        "stage2.image_size": 64, "stage2.lr": 1e-2,
    },
    # The embedded default: the synthetic dataset on 2 CPU cores.
    "demo": {
        "data.image_size": 128,
        "bank.encoder": "imagenet-efficientnet-lite0", "bank.k": 3, "bank.nk": 20, "bank.encoder_size": 128,
        "model.backbone": "efficientnet_lite0", "model.levels": (1, 2, 3),
        "train.epochs": 2, "train.batch_size": 10, "train.lr": 1e-4, "train.weight_decay": 0.003,
        "train.max_val": 0, "train.log_every": 10,
        "stage2.backbone": "efficientnet_lite0", "stage2.pretrained": True, "stage2.epochs": 6,
        "stage2.batch_size": 10, "stage2.image_size": 128, "stage2.lr": 1e-3, "stage2.output_stride": 16,
    },
    # Sec. 4.1 of the paper.
    "paper": {
        "data.image_size": 224,
        "bank.encoder": "medclip", "bank.k": 3, "bank.nk": 100,
        "model.backbone": "mit_b1", "model.levels": (1, 2, 3), "model.delta": 0.15,
        "loss.alpha": 1.0, "loss.beta": 0.5, "loss.theta1": 1.0, "loss.theta2": 0.5, "loss.tau": 1.0,
        "train.epochs": 10, "train.batch_size": 10, "train.lr": 1e-5, "train.weight_decay": 0.003,
        "train.amp": "bf16", "data.num_workers": 8,
        "stage2.backbone": "resnet101", "stage2.epochs": 20, "stage2.batch_size": 10, "stage2.image_size": 224,
    },
}

_METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "pbip": {},
    # Baseline CAM: same backbone and schedule, a 1x1 conv classifier, L_CLS only.
    "cam": {"model.sim": False, "loss.fgs": False, "loss.bgs": False},
    # The official repository's behaviour (docs/DESIGN.md).
    "official": {
        "model.levels": (1, 2, 3, 4), "model.normalize_prototypes": False, "model.learn_logit_scale": True,
        "model.logit_scale": 1 / 0.07, "model.threshold_scope": "global", "model.delta": 0.5,
        "model.output_stride": 16, "model.input_norm": "official", "model.cam_source": "last",
        "model.pairs": "subclass", "model.separation": "official", "model.fgbg_space": "encoder",
        "bank.selection": "centroid",
        "loss.cls_level_weights": (0.0, 0.1, 1.0, 1.5), "loss.beta": 0.1, "loss.theta1": 1.0,
        "loss.theta2": 1.0, "loss.tau": 0.07, "loss.cam_reg": 0.0005, "loss.nce": "batch",
        "train.schedule": "linear",
        "pseudo.level_weights": (0.0, 0.3, 0.3, 0.4), "pseudo.white_background": False,
        "pseudo.merge": "softmax", "pseudo.cam_norm": "relu_minmax", "pseudo.tta": True,
        "pseudo.test_checkpoint": "last",
    },
}

# Keys whose preset value only applies on top of the paper profile (the CPU profiles keep their scale; the MLP width
# 256 = 0.5 x the 512-d MedCLIP prototypes of the official code).
_PAPER_ONLY_OFFICIAL = {"train.lr": 5e-5, "train.weight_decay": 1e-3, "train.epochs": 8, "model.proj_hidden": 256}


def profile_overrides(profile: str) -> dict[str, Any]:
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return dict(_PROFILE_OVERRIDES[profile])


def method_preset(method: str, profile: str = "paper") -> dict[str, Any]:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    preset = dict(_METHOD_PRESETS[method])
    if method == "official" and profile == "paper":
        preset.update(_PAPER_ONLY_OFFICIAL)
    return preset


def make_config(
    profile: str = "demo",
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    yaml_path: str | Path | None = None,
) -> Config:
    """Build a :class:`Config` from a profile, an optional YAML file and overrides.

    ``overrides`` is a mapping of dotted keys or an iterable of ``"key=value"`` strings (as from ``--set``).
    ``method`` may be among them; its preset is applied before the other overrides.
    """
    cfg = Config(profile=profile)
    apply_overrides(cfg, profile_overrides(profile))
    if yaml_path is not None:
        apply_overrides(cfg, dict(_flatten(load_yaml(yaml_path))))
    ov = parse_overrides(overrides or {})
    method = ov.pop("method", None) or cfg.method
    cfg.method = str(method)
    apply_overrides(cfg, method_preset(cfg.method, profile))
    apply_overrides(cfg, ov)
    apply_seed_rule(cfg)
    validate(cfg)
    return cfg


def apply_seed_rule(cfg: Config) -> Config:
    """``bank.seed_from_train``: the bank's seed follows the run's ``train.seed`` (Figure 4's random sub-banks are
    drawn anew per seed; the cluster selection stays a function of ``bank.seed`` alone)."""
    if cfg.bank.seed_from_train:
        cfg.bank.seed = cfg.train.seed
    return cfg


def load_config(path: str | Path) -> Config:
    """Read a config saved by :meth:`Config.save` (exactly, without re-applying profiles)."""
    cfg = Config()
    apply_overrides(cfg, dict(_flatten(load_yaml(path))))
    validate(cfg)
    return cfg


def load_yaml(path: str | Path, not_a_mapping: str = "expected a mapping of config keys at the top level",
              what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping; ConfigError naming the file when it is missing, invalid or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: {not_a_mapping}")
    return data


def parse_overrides(overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    """``["train.lr=1e-5", "model.sim=false"]`` -> ``{"train.lr": 1e-5, "model.sim": False}``."""
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, for example train.lr=1e-5")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    for key, value in overrides.items():
        set_key(cfg, key, value)
    return cfg


def get_key(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"unknown config key {key!r}")
        obj = getattr(obj, part)
    return obj


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted key, coercing the value to the field's type (``"1e-5"`` -> float, ``"false"`` -> bool)."""
    parts = key.split(".")
    obj: Any = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
            raise ConfigError(f"unknown config key {key!r}; see `pbip config --profile demo` for all keys")
        obj = getattr(obj, part)
    name = parts[-1]
    fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    if name not in fields or dataclasses.is_dataclass(getattr(obj, name)):
        raise ConfigError(f"unknown config key {key!r}; see `pbip config --profile demo` for all keys")
    if key in _LEGACY_VALUES and _hashable(value) and value in _LEGACY_VALUES[key]:
        value = _LEGACY_VALUES[key][value]
    setattr(obj, name, _coerce(key, getattr(obj, name), value))


# Values of older configs (and of YAML, where `off` reads as false) -> today's: train.amp was a bf16 on/off switch.
_LEGACY_VALUES: dict[str, dict[Any, Any]] = {
    "train.amp": {True: "bf16", False: "off", "on": "bf16", "true": "bf16", "false": "off", "True": "bf16",
                  "False": "off"},
}


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _coerce(key: str, current: Any, value: Any) -> Any:
    if isinstance(value, str) and not isinstance(current, str):
        value = yaml.safe_load(value)
    try:
        if isinstance(current, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if isinstance(current, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if isinstance(current, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(current, tuple):
            if isinstance(value, (int, float)):
                value = [value]
            if isinstance(value, str):
                value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
            return tuple(value)
        if isinstance(current, str):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config key {key!r}: cannot use {value!r} (expected {type(current).__name__})"
        ) from None
    return value


def literal_errors(obj: Any, prefix: str = "") -> list[str]:
    """One message per field of a (nested) config dataclass whose value is not among its ``Literal`` choices."""
    errors = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            errors += literal_errors(value, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            choices = "|".join(map(str, typing.get_args(hint)))
            errors.append(f"{prefix}{f.name}={value!r} is not one of {choices}")
    return errors


def validate(cfg: Config) -> None:
    """ConfigError naming the first invalid key: unknown choices, out-of-range numbers, inconsistent lengths."""
    bad = literal_errors(cfg)
    if bad:
        raise ConfigError(bad[0])
    tr, s2 = cfg.train, cfg.stage2

    def positive(x: float) -> bool:
        return math.isfinite(x) and x > 0

    def non_negative(x: float) -> bool:
        return math.isfinite(x) and x >= 0

    checks = [
        (0.0 <= cfg.model.delta <= 1.0, "model.delta must be in [0, 1] (eq. 4)"),
        (cfg.bank.k >= 1, "bank.k must be >= 1"),
        (cfg.bank.nk >= 1, "bank.nk must be >= 1"),
        (cfg.bank.batch_size >= 1, "bank.batch_size must be >= 1"),
        (cfg.bank.kmeans_iters >= 1 and cfg.bank.kmeans_restarts >= 1,
         "bank.kmeans_iters and bank.kmeans_restarts must be >= 1"),
        (0.0 <= cfg.bank.white_threshold <= 1.0, "bank.white_threshold must be in [0, 1]"),
        (cfg.bank.encoder_size >= 0, "bank.encoder_size must be >= 0 (0 = the encoder's native size)"),
        (cfg.data.image_size >= 8, "data.image_size must be >= 8 pixels"),
        (cfg.data.max_train >= 0 and cfg.data.num_workers >= 0, "data.max_train and data.num_workers must be >= 0"),
        (positive(cfg.loss.tau), "loss.tau must be > 0"),
        (positive(tr.lr), f"train.lr must be > 0, got {tr.lr}"),
        (non_negative(tr.weight_decay), f"train.weight_decay must be >= 0, got {tr.weight_decay}"),
        (tr.batch_size >= 1, "train.batch_size must be >= 1"),
        (tr.epochs >= 1, (f"train.epochs must be >= 1, got {tr.epochs} (a run with no epoch would save an "
                          "untrained model as best.pt)")),
        (tr.warmup_steps >= 0 and tr.val_every >= 0 and tr.max_val >= 0 and tr.encoder_chunk >= 0,
         "train.warmup_steps, train.val_every, train.max_val and train.encoder_chunk must be >= 0"),
        (tr.log_every >= 1, "train.log_every must be >= 1"),
        (bool(DEVICE_PATTERN.fullmatch(tr.device)), f"train.device={tr.device!r} is not one of {DEVICE_CHOICES}"),
        (positive(s2.lr), f"stage2.lr must be > 0, got {s2.lr}"),
        (s2.epochs >= 1, f"stage2.epochs must be >= 1, got {s2.epochs}"),
        (s2.batch_size >= 1, "stage2.batch_size must be >= 1"),
        (0.0 <= s2.momentum < 1.0, f"stage2.momentum must be in [0, 1), got {s2.momentum}"),
        (non_negative(s2.weight_decay), f"stage2.weight_decay must be >= 0, got {s2.weight_decay}"),
        (positive(s2.power), f"stage2.power must be > 0, got {s2.power}"),
        (s2.image_size >= 8, "stage2.image_size must be >= 8 pixels"),
        (s2.output_stride in (8, 16), f"stage2.output_stride must be 8 or 16, got {s2.output_stride}"),
        (0.0 <= cfg.pseudo.white_threshold <= 1.0, "pseudo.white_threshold must be in [0, 1]"),
        (len(cfg.model.levels) >= 1 and all(1 <= lv <= 4 for lv in cfg.model.levels),
         "model.levels must be backbone stages in 1..4"),
        (not cfg.loss.cls_level_weights or len(cfg.loss.cls_level_weights) == len(cfg.model.levels),
         "loss.cls_level_weights needs one weight per entry of model.levels"),
        (not cfg.pseudo.level_weights or len(cfg.pseudo.level_weights) == len(cfg.model.levels),
         "pseudo.level_weights needs one weight per entry of model.levels"),
        (cfg.model.output_stride in (8, 16, 32), "model.output_stride must be 8, 16 or 32"),
        (not (cfg.model.fgbg == "pooled" and cfg.model.separation == "official"),
         "model.fgbg=pooled cannot build the official FG/BG images (model.separation=official); use fgbg=exact"),
        (not cfg.bank.seed_from_train or cfg.bank.seed == cfg.train.seed,
         "bank.seed_from_train=true needs bank.seed == train.seed (make_config sets it)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


# ---------------------------------------------------------------------- helpers
def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _to_yaml(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _to_yaml(v) for k, v in d.items()}
    if isinstance(d, tuple):
        return list(d)
    return d


def config_table(cfg: Config) -> str:
    """All keys and values, one per line (``pbip config``)."""
    flat = cfg.flat()
    width = max(len(k) for k in flat)
    return "\n".join(f"{k:<{width}}  {v!r}" for k, v in flat.items())


def clone(cfg: Config) -> Config:
    return copy.deepcopy(cfg)
