"""Load a config file, apply `--config.key=value` overrides, validate, derive.

A config file is a Python file with `get_config()` returning a dict that starts from
`configs/base.py`. The loaded `Config` is immutable; values that follow from it (global
batch, step counts) are computed by `derive()` and never written back.

This module imports neither jax nor torch, so torchref and compare read configs with it.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from jaxface.defaults import Unset
from jaxface.defaults import get_config as get_defaults
from jaxface.models.names import NETWORKS, remat_problem

PRECISIONS = ("fp32", "bf16", "fp16")
GRAD_REDUCE_DTYPES = ("fp32", "bf16")
OPTIMIZERS = ("sgd", "adamw")
MARGIN_GRADS = ("straight_through", "exact")
PROGRESS_MODES = ("auto", "bar", "plain")
# The head's losses (jaxface/heads/losses.py keeps the same lists; no jax here).
LOSSES = ("margin", "adaface", "curricularface", "magface", "elasticface_arc", "elasticface_cos")
NORM_LOSSES = ("adaface", "magface")  # read the embedding's norm before normalisation
# Backbones that L2-normalise their own output (norm always 1), so AdaFace and MagFace cannot
# read a feature norm from them. Every IResNet returns the un-normalised embedding (the
# `features` BatchNorm's output), whose norm is the one AdaFace and MagFace use.
NORMALISED_BACKBONES: frozenset[str] = frozenset()


class ConfigError(ValueError):
    """A config that cannot be loaded or is not valid; the message names the file or key."""


def _positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _one_of(*choices):
    def check(v) -> str | None:
        return None if v in choices else f"must be one of {', '.join(map(str, choices))}"

    return check


def _unit_interval(v) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _margins(v) -> str | None:
    if len(v) != 3:
        return "must be three numbers (m1, m2, m3)"
    m1, m2, m3 = v
    if not 1.0 <= m1 <= 4.0:
        return f"m1={m1} out of range: the multiplicative (SphereFace) margin must be in [1, 4]"
    if not 0.0 <= m2 < math.pi / 2:
        return f"m2={m2} out of range: the additive angular (ArcFace) margin must be in [0, pi/2)"
    if not 0.0 <= m3 < 1.0:
        return f"m3={m3} out of range: the additive cosine (CosFace) margin must be in [0, 1)"
    return None


def _angle(v) -> str | None:
    return None if 0 <= v < math.pi / 2 else "must be in [0, pi/2)"


def _probability(v) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def _betas(v) -> str | None:
    if len(v) != 2 or not all(0 <= b < 1 for b in v):
        return "must be two numbers in [0, 1)"
    return None


def _backbone(v) -> str | None:
    return None if v in NETWORKS else f"unknown backbone; choose one of {', '.join(NETWORKS)}"


def _non_empty(v) -> str | None:
    return None if v.strip() else "must not be empty"


# Rules beyond the type; the types themselves come from the defaults (jaxface/defaults.py).
CHECKS: dict[str, Callable[[Any], str | None]] = {
    "network": _backbone,
    "embedding_size": _positive,
    "dropout": _unit_interval,
    "precision": _one_of(*PRECISIONS),
    "grad_reduce": _one_of(*GRAD_REDUCE_DTYPES),
    "margin_list": _margins,
    "scale": _positive,
    "interclass_filtering_threshold": _unit_interval,
    "margin_grad": _one_of(*MARGIN_GRADS),
    "sample_rate": lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    "loss": _one_of(*LOSSES),
    "adaface_m": _angle,
    "adaface_h": _non_negative,
    "adaface_t_alpha": lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    "curricular_m": _angle,
    "magface_l_a": _positive,
    "magface_u_a": _positive,
    "magface_l_m": _angle,
    "magface_u_m": _angle,
    "magface_lambda_g": _non_negative,
    "elastic_m": _angle,
    "elastic_std": _non_negative,
    "crop_augmentation_prob": _probability,
    "low_res_augmentation_prob": _probability,
    "photometric_augmentation_prob": _probability,
    "optimizer": _one_of(*OPTIMIZERS),
    "lr": _positive,
    "momentum": _unit_interval,
    "weight_decay": _non_negative,
    "adamw_betas": _betas,
    "adamw_eps": _positive,
    "grad_clip_norm": _non_negative,
    "warmup_epoch": _non_negative,
    "lr_power": _positive,
    "num_classes": _positive,
    "num_image": _positive,
    "batch_size": _positive,
    "global_batch_size": _positive,
    "gradient_acc": _positive,
    "num_workers": _non_negative,
    "synthetic_noise": _non_negative,
    "synthetic_jitter": lambda v: None if 0 <= v <= 16 else "must be in [0, 16]",
    "num_epoch": _positive,
    "max_steps": _positive,
    "num_devices": _positive,
    "seed": _non_negative,
    "frequent": _positive,
    "progress": _one_of(*PROGRESS_MODES),
    "checkpoint_every": _non_negative,
    "keep_checkpoints": _positive,
    "verbose": _positive,
    "num_processes": _positive,
    "process_id": _non_negative,
    "distributed_timeout": _positive,
    "signal_timeout": _positive,
    # Below it, the heartbeat's four beats of slack leave no time to notice a silence.
    "peer_timeout": lambda v: None if v >= 5 else "must be at least 5 (seconds)",
    "wandb_mode": _one_of("online", "offline"),
    "output": _non_empty,
}


@dataclass(frozen=True)
class Field:
    kind: type  # int, float, bool, str, tuple (of numbers) or list (of names, kept as a tuple)
    optional: bool  # None allowed (the default is Unset)


def _field(default: Any) -> Field:
    if isinstance(default, Unset):
        return Field(default.kind, True)
    return Field(type(default), False)


DEFAULTS: dict[str, Any] = get_defaults()
FIELDS: dict[str, Field] = {key: _field(value) for key, value in DEFAULTS.items()}
# Keys that take a word besides their type's values: resume=auto (a requeued job resumes,
# its first start does not), decided by the trainer once it sees the output folder.
WORDS: dict[str, tuple[str, ...]] = {"resume": ("auto",)}


class Config(Mapping):
    """An immutable, validated config: `cfg.lr`, `cfg["lr"]`, `dict(cfg)`."""

    __slots__ = ("_values", "source")

    def __init__(self, values: Mapping[str, Any], source: str = "<dict>"):
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))
        object.__setattr__(self, "source", source)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r}") from None

    def __setattr__(self, key, value):
        raise AttributeError(f"config is immutable: cannot set {key!r}; use replace()")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Config({dict(self._values)!r})"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._values.items()}

    def replace(self, **changes: Any) -> Config:
        """A new validated config with some keys changed (values already typed)."""
        return validate({**self._values, **changes}, self.source)


def _coerce(key: str, value: Any, field: Field, where: str) -> Any:
    """Bring a value from a config file or the command line to the field's type."""
    if field.kind is list and isinstance(value, str) and value.lower() in ("none", "null", ""):
        return ()  # `--config.val_targets=none`: no verification sets
    if (
        value is None
        or isinstance(value, Unset)
        or (isinstance(value, str) and value.lower() in ("none", "null"))
    ):
        if field.optional:
            return None
        raise ConfigError(f"{where}: config key {key!r} must not be None")
    if isinstance(value, str) and value.strip().lower() in WORDS.get(key, ()):
        return value.strip().lower()
    kind = field.kind
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, str):
                value = ast.literal_eval(value.replace("_", ""))
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                raise ValueError
            return value
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if kind is list:
            if isinstance(value, str):
                text = value.strip()
                if text.startswith(("(", "[")):
                    value = ast.literal_eval(text)
                else:
                    value = [v.strip() for v in text.split(",") if v.strip()]
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return tuple(value)
        if kind is tuple:
            if isinstance(value, str):
                text = value.strip()
                value = ast.literal_eval(text if text.startswith(("(", "[")) else f"({text},)")
            if not isinstance(value, list | tuple):
                raise ValueError
            return tuple(float(v) for v in value)
    except (ValueError, TypeError, SyntaxError):
        pass
    expected = {
        tuple: "a list of numbers like 1.0,0.5,0.0",
        list: "a list of names like lfw,cfp_fp",
    }.get(kind, kind.__name__)
    if key in WORDS:
        values = ("true", "false") if kind is bool else (expected,)
        expected = f"{', '.join(values)} or {' or '.join(WORDS[key])}"
    raise ConfigError(f"{where}: config key {key!r} expects {expected}, got {value!r}")


def validate(
    values: Mapping[str, Any], source: str = "<dict>", from_command_line: frozenset = frozenset()
) -> Config:
    """Type-check every key, reject unknown or missing ones and impossible values. Errors
    name `--config.KEY` for keys in `from_command_line`, the file `source` for the rest."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown config key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; known keys are listed in jaxface/defaults.py"
        )
    missing = sorted(set(FIELDS) - set(values))
    if missing:
        raise ConfigError(
            f"{source}: config is missing {', '.join(map(repr, missing))}; "
            "start the config from configs.base.get_config()"
        )
    typed = {}
    for key, field in FIELDS.items():
        value = _coerce(key, values[key], field, source)
        check = CHECKS.get(key)
        if value is not None and check is not None:
            problem = check(value)
            if problem:
                where = f"--config.{key}" if key in from_command_line else source
                raise ConfigError(f"{where}: config key {key!r}={value!r} {problem}")
        typed[key] = value
    _official_loss_values(typed)
    _check_consistency(typed, source)
    return Config(typed, source)


# What each loss's official code uses for the keys left unset (None): a loss switch on the
# command line brings its own paper's setting. margin_grad: arcface_torch applies the margin
# under no_grad; AdaFace, CurricularFace, MagFace and ElasticFace differentiate it (autograd).
# ElasticFace: fdbtrs/ElasticFace config/config.py (ElasticArcFace m 0.5 std 0.05,
# ElasticArcFacePlus std 0.0175, ElasticCosFace m 0.35 std 0.05, ElasticCosFacePlus std 0.02).
_ELASTIC_M = {"elasticface_arc": 0.5, "elasticface_cos": 0.35}
_ELASTIC_STD = {
    ("elasticface_arc", False): 0.05,
    ("elasticface_arc", True): 0.0175,
    ("elasticface_cos", False): 0.05,
    ("elasticface_cos", True): 0.02,
}


def official_loss_values(loss: str, elastic_plus: bool = False) -> dict[str, Any]:
    """The values `margin_grad`, `elastic_m` and `elastic_std` take for `loss` when unset."""
    kind = loss if loss in _ELASTIC_M else "elasticface_arc"  # unused by the other losses
    return {
        "margin_grad": "straight_through" if loss == "margin" else "exact",
        "elastic_m": _ELASTIC_M[kind],
        "elastic_std": _ELASTIC_STD[kind, elastic_plus],
    }


def _official_loss_values(values: dict[str, Any]) -> None:
    official = official_loss_values(values["loss"], values["elastic_plus"])
    for key, value in official.items():
        if values[key] is None:
            values[key] = value


def _check_consistency(values: dict[str, Any], source: str) -> None:
    """Rules that involve more than one key."""
    if values["remat"] and (problem := remat_problem(values["network"])):
        raise ConfigError(f"{source}: config key 'remat'=True: {problem}")
    if values["wandb"] and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"{source}: config key 'wandb'=True needs the wandb package: "
            "pip install -e '.[wandb]' (or set --config.wandb=false)"
        )
    loss = values["loss"]
    if loss in NORM_LOSSES and values["network"] in NORMALISED_BACKBONES:
        raise ConfigError(
            f"{source}: config key 'loss'={loss!r} reads the embedding's norm before "
            f"normalisation, but backbone {values['network']!r} returns L2-normalised "
            "embeddings (norm 1); use a backbone that returns the un-normalised one (IResNet)"
        )
    if loss == "magface":
        if values["magface_u_a"] <= values["magface_l_a"]:
            raise ConfigError(
                f"{source}: config key 'magface_u_a'={values['magface_u_a']} must be > "
                f"magface_l_a={values['magface_l_a']}"
            )
        if values["magface_u_m"] < values["magface_l_m"]:
            raise ConfigError(
                f"{source}: config key 'magface_u_m'={values['magface_u_m']} must be >= "
                f"magface_l_m={values['magface_l_m']}"
            )
    if loss != "margin" and values["interclass_filtering_threshold"] > 0:
        raise ConfigError(
            f"{source}: config key 'interclass_filtering_threshold' applies to loss='margin' "
            f"only, not {loss!r}"
        )
    many = (values["num_processes"] or 1) > 1
    if many and values["coordinator_address"] is None and not values["distributed"]:
        raise ConfigError(
            f"{source}: config key 'num_processes'={values['num_processes']} needs "
            "'coordinator_address' (process 0's host:port) or distributed=true (a cluster "
            "that jax detects); without either every process would train alone"
        )
    if values["coordinator_address"] is not None:
        for key in ("num_processes", "process_id"):
            if values[key] is None:
                raise ConfigError(
                    f"{source}: config key 'coordinator_address' is set, so {key!r} must be too"
                )
        if values["process_id"] >= values["num_processes"]:
            raise ConfigError(
                f"{source}: config key 'process_id'={values['process_id']} must be < "
                f"num_processes={values['num_processes']}"
            )


def _load_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; give a .py file in it")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    # Job files import `configs.base`: make the folder above the `configs` package
    # importable while the file runs, wherever the process was started from.
    root = path.parent.parent if (path.parent / "__init__.py").exists() else path.parent
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location(f"_jaxface_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any error in user code becomes one message
        raise ConfigError(f"config file {str(path)!r} failed to load: {exc!r}") from exc
    finally:
        sys.path.remove(str(root))
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file {str(path)!r} does not define get_config()")
    try:
        values = get_config()
    except Exception as exc:  # noqa: BLE001 - any error in user code becomes one message
        raise ConfigError(f"config file {str(path)!r}: get_config() raised {exc!r}") from exc
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"config file {str(path)!r}: get_config() returned {type(values).__name__}, "
            "expected a dict"
        )
    return dict(values)


def parse_overrides(args: Sequence[str]) -> dict[str, str]:
    """`--config.key=value` or `--config.key value` pairs to {key: text}."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise ConfigError(
                f"unexpected argument {arg!r}; overrides look like --config.KEY=VALUE"
            )
        body = arg[len("--config.") :]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(args):
            key, value = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r} has no value")
        overrides[key] = value
        i += 1
    return overrides


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load a config file, apply overrides (strings from the command line, or values)."""
    path = Path(path)
    values = _load_file(path)
    source = str(path)
    for key, value in (overrides or {}).items():
        if key not in FIELDS:
            raise ConfigError(
                f"--config.{key}: unknown config key {key!r}; known keys are in jaxface/defaults.py"
            )
        values[key] = _coerce(key, value, FIELDS[key], f"--config.{key}")
    _check_no_dead_override(values, overrides or {}, source)
    return validate(values, source, frozenset(overrides or ()))


# Keys that decide what another key would: (decides, overridden, what they decide).
_SHADOWS = (("global_batch_size", "batch_size", "the batch"),)


def _check_no_dead_override(values, overrides, source: str) -> None:
    """A command-line value that another key of the config overrides would be silently
    ignored: refuse it, naming both keys."""
    for decides, shadowed, what in _SHADOWS:
        if shadowed not in overrides or decides in overrides or decides not in values:
            continue
        value = _coerce(decides, values[decides], FIELDS[decides], source)
        if value is not None:
            raise ConfigError(
                f"--config.{shadowed}: has no effect, {source} sets "
                f"{decides}={value!r}, which decides {what}; change "
                f"--config.{decides} instead (or add --config.{decides}=none to use "
                f"{shadowed})"
            )


@dataclass(frozen=True)
class Derived:
    """Values that follow from a config and the device count."""

    num_devices: int
    batch_per_device: int
    global_batch: int  # one micro-batch over all devices
    samples_per_step: int  # global_batch x gradient_acc
    steps_per_epoch: int
    schedule_steps: int  # the LR schedule's length: num_epoch epochs
    run_steps: int  # steps this run takes: the schedule, cut short by max_steps
    warmup_steps: int
    num_classes_padded: int  # num_devices x rows per device: the class-sharded head's rows
    num_local_classes: int
    num_sample: int | None  # centres each device scores per step when sample_rate < 1


# Rows of the centre matrix per device are a multiple of this when every row is scored.
DENSE_ROW_ALIGN = 512


# Sampled rows per device are rounded up to a multiple of this: XLA:GPU pads the scored rows
# (and the logits' gradient) of the head's matmuls to it otherwise, two copies every step
# (125,000 -> 125,024 rows at 10 M classes on 8 devices: about 1 GB of traffic).
SAMPLE_ROW_ALIGN = 32


def class_rows_per_device(num_classes: int, num_devices: int, dense: bool = True) -> int:
    """Rows of the centre matrix each device holds: ceil(C / D), and with a dense head
    (sample_rate 1) rounded up to a multiple of DENSE_ROW_ALIGN.

    The embeddings' gradient contracts the logits' gradient with the centres over the
    classes; XLA:GPU splits that contraction into chunks (split-K), and when the rows do not
    divide it pads a copy of the whole centre matrix (and of the logits' gradient) every
    step: 1.27 GB written and read again at 617,970 classes. Aligned rows cost nothing
    (a few hundred zero rows, masked out of the softmax like the rest of the padding).
    With sampling the contraction runs over the sampled rows, so nothing is rounded."""
    rows = -(-num_classes // num_devices)
    if dense:
        rows = -(-rows // DENSE_ROW_ALIGN) * DENSE_ROW_ALIGN
    return rows


def derive(cfg: Config, num_devices: int) -> Derived:
    """Batch sizes, step counts and shard sizes for a run on `num_devices` devices."""
    if cfg.global_batch_size is not None:
        if cfg.global_batch_size % num_devices:
            raise ConfigError(
                f"{cfg.source}: config key 'global_batch_size'={cfg.global_batch_size} is not "
                f"divisible by the {num_devices} devices of the mesh"
            )
        batch_per_device = cfg.global_batch_size // num_devices
    else:
        batch_per_device = cfg.batch_size
    global_batch = batch_per_device * num_devices
    samples_per_step = global_batch * cfg.gradient_acc
    steps_per_epoch = cfg.num_image // samples_per_step
    if steps_per_epoch < 1:
        key = "gradient_acc" if cfg.num_image >= global_batch else "num_image"
        raise ConfigError(
            f"{cfg.source}: config key {key!r}: num_image={cfg.num_image} is smaller than one "
            f"optimizer step ({batch_per_device} x {num_devices} devices x gradient_acc "
            f"{cfg.gradient_acc} = {samples_per_step} images)"
        )
    schedule_steps = max(1, int(steps_per_epoch * cfg.num_epoch))
    warmup_steps = int(steps_per_epoch * cfg.warmup_epoch)
    if warmup_steps >= schedule_steps and warmup_steps > 0:
        raise ConfigError(
            f"{cfg.source}: config key 'warmup_epoch'={cfg.warmup_epoch} leaves no steps after "
            f"warm-up (num_epoch={cfg.num_epoch})"
        )
    run_steps = schedule_steps if cfg.max_steps is None else min(schedule_steps, cfg.max_steps)
    num_local = class_rows_per_device(cfg.num_classes, num_devices, dense=cfg.sample_rate >= 1)
    num_sample = None
    if cfg.sample_rate < 1:
        # arcface_torch: int(sample_rate * num_local); here up to SAMPLE_ROW_ALIGN - 1 more.
        num_sample = int(cfg.sample_rate * num_local)
        num_sample = min(num_local, -(-num_sample // SAMPLE_ROW_ALIGN) * SAMPLE_ROW_ALIGN)
        # Shapes are static: every positive class of a global batch must fit.
        needed = min(global_batch, num_local)
        if num_sample < needed:
            raise ConfigError(
                f"{cfg.source}: config key 'sample_rate'={cfg.sample_rate} keeps {num_sample} of "
                f"the {num_local} centres on each device, but one global batch of {global_batch} "
                f"can bring up to {needed} positive classes to a device; use sample_rate >= "
                f"{needed / num_local:.4g}"
            )
    return Derived(
        num_devices=num_devices,
        batch_per_device=batch_per_device,
        global_batch=global_batch,
        samples_per_step=samples_per_step,
        steps_per_epoch=steps_per_epoch,
        schedule_steps=schedule_steps,
        run_steps=run_steps,
        warmup_steps=warmup_steps,
        num_classes_padded=num_local * num_devices,
        num_local_classes=num_local,
        num_sample=num_sample,
    )
