"""Every key of a jaxface job, with its default and meaning: listed here once.

A key's type is its default's: bool, int, float, str, a tuple of numbers, or a list of
names. `Unset(kind)` is a default of None for a key that takes values of `kind` (as
ml_collections' `placeholder`). Job files start from `configs/base.py`, which is this
`get_config()`, and change a few keys. Field names follow arcface_torch's configs where the
meaning is the same. No jax or torch here: torchref reads the same configs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unset:
    """A None default of a key whose values are `kind` (int or str)."""

    kind: type

    def __repr__(self) -> str:
        return "None"


def get_config() -> dict:
    return dict(
        # Model.
        network="r50",  # r18 ... r200, mbf, mbf_large, vit_t ... vit_h; iresnet_tiny for demos
        embedding_size=512,
        dropout=0.0,  # before the fc layer, as arcface_torch
        remat=False,  # recompute each block in the backward pass (mbf*, vit_*): less memory
        precision="fp32",  # fp32 | bf16 | fp16 (with dynamic loss scaling): the trunk's dtype
        tf32=True,  # float32 matmuls/convolutions on TF32 tensor cores (GPUs that have them)
        sync_bn=False,  # False: BatchNorm statistics per device (arcface_torch); True: global
        # Gradients summed across devices in: fp32 (as DDP's default) | bf16 (half the bytes
        # on the wire, for runs whose network is the bottleneck; docs/multi-gpu.md).
        grad_reduce="fp32",
        # SGD on a dense head (sample_rate 1): the centres updated from the cosines'
        # gradient, on NVIDIA GPUs in one Pallas kernel that never writes theirs; false: the
        # centres differentiated (XLA writes their gradient). docs/gpu.md
        fused_head_update=True,
        # Margin softmax: target logit = cos(m1 * theta + m2) - m3, then times `scale`.
        margin_list=(1.0, 0.5, 0.0),  # ArcFace; (1.0, 0.0, 0.4) is CosFace
        scale=64.0,
        interclass_filtering_threshold=0.0,  # > 0 zeroes negative cosines above it
        # straight_through (arcface_torch) | exact. None: the loss's official one, i.e.
        # straight_through for loss=margin, exact for the others (their code uses autograd).
        margin_grad=Unset(str),
        sample_rate=1.0,  # Partial FC: fraction of each device's centres scored per step
        # The head's loss (docs/losses.md): margin (the combined margin above, ArcFace by
        # default) | adaface | curricularface | magface | elasticface_arc | elasticface_cos.
        # `scale` and `margin_grad` apply to every loss; margin_list only to `margin`.
        loss="margin",
        adaface_m=0.4,  # AdaFace (mk-minchul/AdaFace head.py): the margin
        adaface_h=0.333,  # how strongly the feature norm moves the margin, >= 0 (0: CosFace-like)
        adaface_t_alpha=0.01,  # momentum of the norm's running mean and std, in (0, 1]
        curricular_m=0.5,  # CurricularFace: the additive angular margin
        magface_l_a=10.0,  # MagFace: feature norms are clipped to [l_a, u_a]
        magface_u_a=110.0,
        magface_l_m=0.45,  # the margin at norm l_a ...
        magface_u_m=0.8,  # ... rising linearly to this at norm u_a
        magface_lambda_g=35.0,  # weight of the norm regulariser g(a) = a / u_a^2 + 1 / a
        # ElasticFace: mean of the per-sample margin; None: the official 0.5 (Arc) / 0.35 (Cos).
        elastic_m=Unset(float),
        # its standard deviation; None: the official 0.05, or for the "+" variants 0.0175
        # (Arc) / 0.02 (Cos) (fdbtrs/ElasticFace config/config.py).
        elastic_std=Unset(float),
        elastic_plus=False,  # ElasticFace+: margins handed out by the target cosine's order
        # Optimisation.
        optimizer="sgd",  # sgd | adamw
        lr=0.1,
        momentum=0.9,  # sgd only
        weight_decay=5e-4,  # on every parameter, as arcface_torch
        adamw_betas=(0.9, 0.999),
        adamw_eps=1e-8,
        grad_clip_norm=5.0,  # global norm, backbone gradients only; 0 disables
        warmup_epoch=0.0,
        lr_power=1.0,  # polynomial decay to 0 after warm-up
        # Data.
        # "synthetic" (drawn in memory), a folder holding train.rec/train.idx, a .rec file,
        # an image folder (one sub-folder per identity) or "tfds:NAME".
        rec="synthetic",
        pack_synthetic=False,  # true: pack the synthetic identities into `rec` on first use
        num_workers=2,  # decoding processes of the host loader (0: decode in the trainer)
        flip=True,  # random horizontal flip, as arcface_torch
        augment=False,  # arcface_torch's DALI-style set: downscale, blur, colour, grayscale
        # AdaFace's augmentation (its dataset code), each with its probability (0: off):
        adaface_augment=False,  # true: random crop into a zero frame, low resolution, jitter
        crop_augmentation_prob=0.2,  # RandomResizedCrop scale (0.2, 1), ratio (3/4, 4/3)
        low_res_augmentation_prob=0.2,  # down to 0.2-1 of the side and back up
        photometric_augmentation_prob=0.2,  # brightness, contrast, saturation +-50 %
        skip_corrupt=False,  # skip (and report) bad records instead of stopping
        num_classes=1000,
        num_image=100_000,
        batch_size=128,  # per device
        global_batch_size=Unset(int),  # if set: split over the devices, batch_size is not used
        gradient_acc=1,  # micro-batches averaged into one optimizer step
        synthetic_noise=0.35,  # std of the per-image noise, image values in [0, 1]
        synthetic_jitter=4,  # max shift in pixels of each image against its identity
        # Run.
        num_epoch=20.0,
        max_steps=Unset(int),  # stop after this many steps whatever num_epoch says
        num_devices=Unset(int),  # None: every device of the mesh; n: the first n
        seed=2048,
        frequent=10,  # log every this many steps
        progress="auto",  # auto (a live line on a terminal, plain lines otherwise) | bar | plain
        output="work_dirs/run",
        # Checkpoints and evaluation.
        # true: continue from the latest usable checkpoint in output/checkpoints; auto: the
        # same if output holds a checkpoint, else start fresh (one command for the first
        # start and every requeue of a cluster job, docs/faults.md)
        resume=False,
        allow_data_change=False,  # resume even if batch size, seed or data differ (a new stream)
        # resume even if the train state's structure changed (momentum switched off, sampling
        # switched on, another optimizer or loss): restore what matches, initialise the rest
        allow_state_change=False,
        init_from=Unset(str),  # fine-tune from a backbone (model.pt or jaxface .npz), fresh head
        checkpoint_every=2000,  # steps; checkpoints are also written at each epoch end
        keep_checkpoints=3,
        # Verification sets: a path to a .bin, a name looked up as <rec>/<name>.bin (lfw,
        # cfp_fp, agedb_30 as arcface_torch), or "synthetic" (held-out synthetic identities);
        # --config.val_targets=none: none (on synthetic or own data).
        val_targets=[],
        verbose=2000,  # evaluate on val_targets every this many steps, and at the end
        tensorboard=True,  # events in output/tensorboard besides metrics.jsonl
        # Weights & Biases (pip install -e '.[wandb]'): the same records, the run's config;
        # a resumed run continues its W&B run. mode: online | offline (OUTPUT/wandb, synced
        # later with `wandb sync`).
        wandb=False,
        wandb_project="jaxface",
        wandb_entity=Unset(str),  # the W&B team or user; None: the account's default
        wandb_name=Unset(str),  # None: the output folder's name
        wandb_mode="online",
        # Multi-host (see README): explicit coordinator, or cluster auto-detection.
        distributed=False,  # true: jax.distributed.initialize() from the environment (SLURM...)
        coordinator_address=Unset(str),  # "host:port" of process 0; then num_processes, process_id
        num_processes=Unset(int),
        process_id=Unset(int),
        distributed_timeout=300,  # seconds to wait for the coordinator and the others
        signal_timeout=120.0,  # seconds a SIGTERM/SIGINT may take to save before exiting
        # seconds after which a silent process of a multi-process run counts as lost: every
        # other process then stops with a message (docs/faults.md); long enough for a busy
        # host's heartbeat, short enough not to waste a cluster's allocation
        peer_timeout=120.0,
    )
