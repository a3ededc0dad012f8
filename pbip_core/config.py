"""One configuration tree for every stage, with named profiles and method presets.

A run is described by :class:`Config`: nested dataclasses whose dotted paths are the keys of
``--set key=value`` (``train.lr=1e-5``, ``model.sim=false``). Three named profiles fix the scale:

* ``smoke``: tests and CI; a few minutes on 2 CPU cores, tiny images and one epoch.
* ``demo``: the embedded default; meaningful on the synthetic dataset in well under 30 minutes on 2 CPU cores.
* ``paper``: the paper's hyperparameters (sec. 4.1) for a GPU and the real datasets.

Method presets (``--set method=...``) switch the method on top of a profile:

* ``pbip``: the paper (default).
* ``cam``: baseline CAM; a 1x1-conv head on the same backbone, L_CLS only, same schedule.
* ``official``: the public code's behaviour as listed in docs/DESIGN.md ("What the official code does differently").

Resolution order: profile defaults -> YAML file (``--config``) -> ``method`` preset -> ``--set`` overrides. A preset
only changes the keys it names, so ``--set method=official --set train.lr=1e-5`` keeps the override.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
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


@dataclass
class DataConfig:
    root: str = "data/synth"          # dataset folder (docs/DESIGN.md format)
    image_size: int = 224             # images are resized to this square size for training
    augment: bool = True              # flips + rot90 (sec. 4.1)
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
    seed: int = 0
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
    threshold_scope: Literal["class", "global"] = "class"   # max per image and class (paper) | over all channels (official)
    proj_hidden: int = 0              # hidden width of the prototype MLP; 0 = same as the level's C_i
    logit_scale: float = 10.0         # s in sigmoid(s * GAP(M_i)) (eq. 7 reading, see model.py); official: learnable, 1/0.07
    learn_logit_scale: bool = False
    normalize_prototypes: bool = True # official code leaves projected prototypes unnormalised
    fgbg: Literal["exact", "pooled"] = "exact"   # encode X_FG and X_BG (paper) | pool the image's features (approx.)


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
    cls_level_weights: tuple[float, ...] = ()   # () = 1 for every level (eq. 8); official: 0, 0.1, 1, 1
    cam_reg: float = 0.0              # official: 0.0005 * mean(CAM of the last level)


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 10
    batch_size: int = 10
    lr: float = 1e-5
    weight_decay: float = 0.003
    schedule: Literal["constant", "linear", "poly"] = "constant"   # official: linear decay
    warmup_steps: int = 0
    device: str = "auto"              # "auto" = cuda if available else cpu
    allow_cpu: bool = False           # the paper profile refuses to run on a CPU unless this is true (tests, tiny data)
    dist_timeout_min: float = 60.0    # torch.distributed process-group timeout (minutes): a stuck rank fails, not hangs
    # FG/BG images per encoder call in the exact chunked step (0 = all 2P in one call). Same mathematics whatever
    # the value; 8 measured fastest on CPU (benchmarks/README.md) and caps the encoder's live graph at 8 images.
    encoder_chunk: int = 8
    # mixed precision for stage 1 and stage 2: bf16 autocast | fp16 autocast with a gradient scaler | off (fp32).
    # Applied on the device the run uses (slow on a CPU without bf16 units: the paper profile's CPU runs are tests)
    amp: Literal["bf16", "fp16", "off"] = "off"
    val_every: int = 1                # validate pseudo masks every N epochs (0 = never)
    max_val: int = 0                  # cap validation images (0 = all)
    log_every: int = 10
    channels_last: bool = False


@dataclass
class PseudoConfig:
    level_weights: tuple[float, ...] = ()   # () = equal weights over the used levels
    labels: Literal["gt", "predicted"] = "gt"   # val/test: classes present in the GT mask | the classifier's
    predict_threshold: float = 0.5    # image-label threshold for labels="predicted"
    white_background: bool = True    # pixels that are white in the image become background_index
    white_threshold: float = 0.85     # a pixel is white if min(R,G,B)/255 > this (after a 3x3 median)


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
        "stage2.backbone": "efficientnet_lite0", "stage2.pretrained": True, "stage2.epochs": 3,
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
        "bank.selection": "centroid",
        "loss.cls_level_weights": (0.0, 0.1, 1.0, 1.0), "loss.beta": 0.1, "loss.theta1": 1.0,
        "loss.theta2": 1.0, "loss.tau": 0.07, "loss.cam_reg": 0.0005,
        "train.schedule": "linear",
        "pseudo.level_weights": (0.0, 0.3, 0.3, 0.4), "pseudo.white_background": False,
    },
}

# Keys whose preset value only applies on top of the paper profile (the CPU profiles keep their scale).
_PAPER_ONLY_OFFICIAL = {"train.lr": 5e-5, "train.weight_decay": 1e-3, "train.epochs": 8}


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
    validate(cfg)
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
    checks = [
        (0.0 <= cfg.model.delta <= 1.0, "model.delta must be in [0, 1] (eq. 4)"),
        (cfg.bank.k >= 1, "bank.k must be >= 1"),
        (cfg.bank.nk >= 1, "bank.nk must be >= 1"),
        (cfg.loss.tau > 0, "loss.tau must be > 0"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.epochs >= 0, "train.epochs must be >= 0"),
        (len(cfg.model.levels) >= 1 and all(1 <= lv <= 4 for lv in cfg.model.levels),
         "model.levels must be backbone stages in 1..4"),
        (not cfg.loss.cls_level_weights or len(cfg.loss.cls_level_weights) == len(cfg.model.levels),
         "loss.cls_level_weights needs one weight per entry of model.levels"),
        (not cfg.pseudo.level_weights or len(cfg.pseudo.level_weights) == len(cfg.model.levels),
         "pseudo.level_weights needs one weight per entry of model.levels"),
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
