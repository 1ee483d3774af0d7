"""What a resume may change: every config key's rule, decided before an array is read.

A checkpoint records the config it was trained with and the names, shapes and dtypes of
its arrays (orbax's metadata). `plan_resume` compares both with the new run before
anything is restored, so a config change is never mistaken for a damaged checkpoint:

- `model` keys (network, embedding_size, num_classes): refused; a checkpoint resumes only
  the model it holds (`init_from` fine-tunes a backbone into another).
- `state` keys (optimizer, momentum, sample_rate, gradient_acc, loss...): honoured when the
  train state keeps its structure (momentum 0.9 -> 0.8, sample_rate 0.5 -> 0.3); when it
  does not (momentum 0.9 -> 0, sampling switched on, another optimizer or loss), refused,
  or with `allow_state_change=true` converted: what matches by name and shape is restored,
  the rest initialised as a fresh run would, and the run says which arrays were.
- `stream` keys (batch size, seed, data, accumulation): they fix the sequence of batches;
  compared through the run's data stream (so 8 devices x 64 -> 4 x 128 is the same
  stream) and refused unless `allow_data_change=true`.
- `honoured` keys (lr, margins, precision, augmentation, epochs...): the new value applies
  from the resumed step on, and the run lists what changed. Switching fp16 loss scaling
  on or off restarts the loss scale.
- `run` keys (output, logging, workers, evaluation, processes): how the run reports and
  runs, not what it computes; changed freely.

Refusals are ConfigError (exit 2) naming the keys and both values; the checkpoints keep
their names. Only a failure to read (a truncated or missing file) marks one damaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxface.config import ConfigError
from jaxface.defaults import get_config as get_defaults

MODEL, STATE, STREAM, HONOURED, RUN = "model", "state", "stream", "honoured", "run"

_RULES: dict[str, tuple[str, ...]] = {
    MODEL: ("network", "embedding_size", "num_classes"),
    STATE: ("optimizer", "momentum", "sample_rate", "gradient_acc", "grad_clip_norm", "loss"),
    # batch_size and global_batch_size act through the global batch, rec and num_image
    # through the data read: the data stream (`data_stream`) is what is compared.
    STREAM: (
        "batch_size", "global_batch_size", "seed", "rec", "num_image", "synthetic_noise",
        "synthetic_jitter",
    ),
    HONOURED: (
        "dropout", "remat", "precision", "tf32", "sync_bn", "grad_reduce", "fused_head_update",
        "margin_list", "scale", "interclass_filtering_threshold", "margin_grad", "adaface_m",
        "adaface_h", "adaface_t_alpha", "curricular_m", "magface_l_a", "magface_u_a", "magface_l_m",
        "magface_u_m", "magface_lambda_g", "elastic_m", "elastic_std", "elastic_plus", "lr",
        "weight_decay", "adamw_betas", "adamw_eps", "warmup_epoch", "lr_power", "flip",
        "augment", "adaface_augment", "crop_augmentation_prob", "low_res_augmentation_prob",
        "photometric_augmentation_prob", "num_epoch", "max_steps",
    ),
    RUN: (
        "pack_synthetic", "num_workers", "skip_corrupt", "num_devices", "frequent", "progress",
        "output", "resume", "allow_data_change", "allow_state_change", "init_from",
        "checkpoint_every", "keep_checkpoints", "val_targets", "verbose", "tensorboard",
        "wandb", "wandb_project", "wandb_entity", "wandb_name", "wandb_mode",
        "distributed", "coordinator_address", "num_processes", "process_id",
        "distributed_timeout", "signal_timeout", "peer_timeout",
    ),
}  # fmt: skip

# Every config key's rule (a test checks that jaxface/defaults.py has no key without one).
KEY_RULES: dict[str, str] = {key: rule for rule, keys in _RULES.items() for key in keys}
_missing = set(get_defaults()) ^ set(KEY_RULES)
assert not _missing, f"config keys without a resume rule (or rules without a key): {_missing}"


@dataclass
class ResumePlan:
    """What a resume does besides restoring: changes it honours (`"lr 0.1 -> 0.05"`), the
    data-stream changes it accepts, whether it converts the state (`allow_state_change`),
    the new state's arrays it then initialises instead of restoring (by name), the saved
    arrays it drops, and whether the fp16 loss scale restarts."""

    honoured: list[str] = field(default_factory=list)
    stream_changes: list[str] = field(default_factory=list)
    converting: bool = False
    converted: list[str] = field(default_factory=list)  # the changes that made it convert
    initialise: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    restart_loss_scale: bool = False


def _change(key: str, old, new) -> str:
    return f"{key} {old!r} -> {new!r}"


def _same(a, b) -> bool:
    # JSON turns tuples into lists; the config keeps tuples.
    norm = lambda v: list(v) if isinstance(v, tuple | list) else v  # noqa: E731
    return norm(a) == norm(b)


def data_stream(cfg, global_batch: int, num_images: int) -> dict:
    """What fixes the sequence of batches: a resume must agree on it to be exact."""
    stream = {
        "global_batch": global_batch,
        "gradient_acc": cfg.gradient_acc,
        "seed": cfg.seed,
        "rec": cfg.rec,
        "num_images": num_images,
    }
    if cfg.rec == "synthetic" or cfg.pack_synthetic:  # the generator's settings are the data
        stream |= {"synthetic_noise": cfg.synthetic_noise, "synthetic_jitter": cfg.synthetic_jitter}
    return stream


def plan_resume(
    meta: dict,
    cfg,
    stream: dict,
    saved_arrays: dict[str, tuple],
    new_arrays: dict[str, tuple],
    where: str,
    *,
    resizable=lambda name: False,
) -> ResumePlan:
    """Decide a resume of the checkpoint at `where` (its `meta`; `saved_arrays`: name ->
    (shape, dtype) from its metadata) into the run `cfg` (`new_arrays`: the same for the
    new train state; `resizable(name)`: arrays whose first dimension may differ, the
    head's padding). Raises ConfigError for a refused change; returns the plan otherwise."""
    saved_cfg = meta.get("config", {})
    changed = {
        k: (saved_cfg[k], cfg[k])
        for k in KEY_RULES
        if k in saved_cfg and not _same(saved_cfg[k], cfg[k])
    }
    for key in _RULES[MODEL]:
        if key in changed:
            old, new = changed[key]
            raise ConfigError(
                f"checkpoint {where} was written for {key}={old!r}, but the config says "
                f"{key}={new!r}; resume with {key}={old!r}, or fine-tune from its backbone in "
                "a new output folder with --config.init_from=OUTPUT/model.pt"
            )
    plan = ResumePlan()
    plan.stream_changes = _stream_changes(
        meta.get("data_stream"), stream, cfg.allow_data_change, where
    )
    differ = _differing_arrays(saved_arrays, new_arrays, resizable)
    state_keys = [_change(k, *changed[k]) for k in _RULES[STATE] if k in changed]
    if differ:
        cause = (
            ", ".join(state_keys)
            if state_keys
            else "no config key changed: the checkpoint comes from another jaxface version"
        )
        if not cfg.allow_state_change:
            raise ConfigError(
                f"resuming {where} would change the train state's structure ({cause}; "
                f"{_summary(differ)}); the checkpoints are untouched: resume with the "
                "checkpoint's values, or set --config.allow_state_change=true to restore what "
                "matches and initialise the rest"
            )
        plan.converting, plan.converted = True, state_keys
        plan.initialise = sorted(name for name in new_arrays if name in differ)
        plan.dropped = sorted(name for name in saved_arrays if name not in new_arrays)
    plan.honoured = [
        _change(k, old, new)
        for k, (old, new) in changed.items()
        if KEY_RULES[k] == HONOURED or (KEY_RULES[k] == STATE and not differ)
    ]
    old_precision = saved_cfg.get("precision", cfg.precision)
    plan.restart_loss_scale = (old_precision == "fp16") != (cfg.precision == "fp16")
    return plan


def _stream_changes(saved: dict | None, stream: dict, allow_change: bool, where: str) -> list[str]:
    """What differs between the data stream a checkpoint was trained on and this run's.
    Raises ConfigError unless `allow_change`; returns the differences, for a warning."""
    if saved is None:  # written before jaxface recorded it
        return []
    changed = [_change(k, saved[k], v) for k, v in stream.items() if k in saved and saved[k] != v]
    if changed and not allow_change:
        raise ConfigError(
            f"resuming {where} would change the data stream ({', '.join(changed)}), so the "
            "run would no longer equal an uninterrupted one; the checkpoints are untouched: "
            "resume with the checkpoint's values, or set --config.allow_data_change=true to "
            "continue on the new stream"
        )
    return changed


def _differing_arrays(saved: dict, new: dict, resizable) -> set[str]:
    """Names present on one side only, or with another shape (beyond a resizable first
    dimension) or dtype."""
    differ = set(saved) ^ set(new)
    for name in set(saved) & set(new):
        (s_shape, s_dtype), (n_shape, n_dtype) = saved[name], new[name]
        if resizable(name) and len(s_shape) == len(n_shape) and len(s_shape) > 0:
            s_shape, n_shape = s_shape[1:], n_shape[1:]
        if tuple(s_shape) != tuple(n_shape) or str(s_dtype) != str(n_dtype):
            differ.add(name)
    return differ


def _summary(names: set[str], shown: int = 2) -> str:
    """'N arrays differ, e.g. opt_state.backbone.2.0.trace...'"""
    groups = sorted({".".join(n.split(".")[:2]) for n in names})
    more = f" and {len(groups) - shown} more" if len(groups) > shown else ""
    return f"{len(names)} arrays differ, under {', '.join(groups[:shown])}{more}"
