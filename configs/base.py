"""Every default of a jaxface job. Job files start from get_config() and change a few keys.

Field names follow arcface_torch's configs where the meaning is the same.
This file imports neither jax nor torch: torchref reads the same configs.
"""


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
        # Margin softmax: target logit = cos(m1 * theta + m2) - m3, then times `scale`.
        margin_list=(1.0, 0.5, 0.0),  # ArcFace; (1.0, 0.0, 0.4) is CosFace
        scale=64.0,
        interclass_filtering_threshold=0.0,  # > 0 zeroes negative cosines above it
        margin_grad="straight_through",  # straight_through (arcface_torch) | exact
        sample_rate=1.0,  # Partial FC: fraction of each device's centres scored per step
        # Optimisation.
        optimizer="sgd",  # sgd | adamw
        lr=0.1,
        momentum=0.9,  # sgd only
        weight_decay=5e-4,  # on every parameter, as arcface_torch
        adamw_betas=(0.9, 0.999),
        adamw_eps=1e-8,
        grad_clip_norm=5.0,  # global norm, backbone gradients only; 0 disables
        warmup_epoch=0,
        lr_power=1.0,  # polynomial decay to 0 after warm-up
        # Data.
        # "synthetic" (drawn in memory), a folder holding train.rec/train.idx, a .rec file,
        # an image folder (one sub-folder per identity) or "tfds:NAME".
        rec="synthetic",
        pack_synthetic=False,  # true: pack the synthetic identities into `rec` on first use
        num_workers=2,  # decoding processes of the host loader (0: decode in the trainer)
        flip=True,  # random horizontal flip, as arcface_torch
        augment=False,  # arcface_torch's DALI-style set: downscale, blur, colour, grayscale
        skip_corrupt=False,  # skip (and report) bad records instead of stopping
        num_classes=1000,
        num_image=100_000,
        batch_size=128,  # per device
        global_batch_size=None,  # if set: split over the devices, batch_size is not used
        gradient_acc=1,  # micro-batches averaged into one optimizer step
        synthetic_noise=0.35,  # std of the per-image noise, image values in [0, 1]
        synthetic_jitter=4,  # max shift in pixels of each image against its identity
        # Run.
        num_epoch=20,
        max_steps=None,  # stop after this many steps whatever num_epoch says
        num_devices=None,  # None: every device of the mesh; n: the first n
        seed=2048,
        frequent=10,  # log every this many steps
        progress="auto",  # auto (a live line on a terminal, plain lines otherwise) | bar | plain
        output="work_dirs/run",
        # Checkpoints and evaluation.
        resume=False,  # continue from the latest checkpoint in output/checkpoints
        init_from=None,  # fine-tune from a backbone (torch model.pt or jaxface .npz), fresh head
        checkpoint_every=2000,  # steps; checkpoints are also written at each epoch end
        keep_checkpoints=3,
        # Verification sets: a path to a .bin, a name looked up as <rec>/<name>.bin (lfw,
        # cfp_fp, agedb_30 as arcface_torch), or "synthetic" (held-out synthetic identities).
        val_targets=(),
        verbose=2000,  # evaluate on val_targets every this many steps, and at the end
        tensorboard=True,  # events in output/tensorboard besides metrics.jsonl
        # Multi-host (see README): explicit coordinator, or cluster auto-detection.
        distributed=False,  # true: jax.distributed.initialize() from the environment (SLURM...)
        coordinator_address=None,  # "host:port" of process 0; then num_processes, process_id
        num_processes=None,
        process_id=None,
        distributed_timeout=300,  # seconds to wait for the coordinator and the others
    )
