"""``attn-inject eval | finetune``: accuracy of a checkpoint on an ImageFolder, and fine-tuning it."""

from __future__ import annotations

import argparse
from typing import Any

from ..finetune.commands import run_eval, run_finetune
from ..finetune.config import KEEP, MIXUP_MODES, PRECISIONS, TrainConfig
from ..finetune.data import check_img_size
from . import console
from .arguments import EPILOG, add_checkpoint_arguments

# --flag -> the create_transform option it sets (timm's train.py flags of the same names)
AUGMENTATION = {
    "aa": "auto_augment",
    "reprob": "re_prob",
    "remode": "re_mode",
    "recount": "re_count",
    "color_jitter": "color_jitter",
    "hflip": "hflip",
    "vflip": "vflip",
    "scale": "scale",
    "ratio": "ratio",
    "train_interpolation": "interpolation",
}


def add_parsers(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="top-1, top-5, loss and per-class accuracy of a checkpoint on DIR/val",
        epilog=EPILOG,
        description="Evaluate a file written by patch, save() or finetune (or a plain checkpoint with --arch) on "
        "the ImageFolder DIR/val with the model's timm eval transform, at the input size, crop and normalisation "
        "the file records. --json adds per-class accuracy and the confusion matrix. Under torchrun the images are "
        "split over the processes.",
    )
    add_checkpoint_arguments(
        evaluate,
        "head size to build: of a plain checkpoint with --arch (default: the arch's), or checked against a file's own",
    )
    evaluate.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    evaluate.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    evaluate.add_argument("--plot", metavar="FILE.png", help="draw the confusion matrix into FILE.png")
    evaluate.add_argument("--force", action="store_true", help="replace an existing --plot file")
    evaluate.set_defaults(run=run_evaluation)

    tune = commands.add_parser(
        "finetune",
        help="fine-tune a checkpoint on an ImageFolder (torchrun for several processes)",
        epilog=EPILOG,
        description="Fine-tune CKPT on DIR/train with timm's augmentation, AdamW and a cosine schedule; decode every "
        "image first (cached); evaluate on DIR/val before the first step and after every epoch; write OUT (a file "
        "that load() and eval read: recipe, data config, class names), NAME.train-state.pt (for --resume), "
        "NAME.metrics.jsonl and, with --ema, NAME.ema.safetensors after every epoch, atomically. Under torchrun "
        "--nproc-per-node N the same command trains with DistributedDataParallel.",
    )
    add_checkpoint_arguments(tune, "classes of the data; a head of another size is replaced with a new one")
    tune.add_argument("--epochs", type=int, required=True, help="epochs over DIR/train")
    tune.add_argument("--output", "-o", required=True, metavar="OUT", help="the fine-tuned model, NAME.safetensors")
    tune.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="global batch per forward, split over the processes (default 32); a step is --grad-accum of them",
    )
    tune.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    tune.add_argument("--attention-lr", type=float, help="peak learning rate of the injected blocks (default: --lr)")
    tune.add_argument(
        "--weight-decay",
        type=float,
        default=0.05,
        help="AdamW weight decay; none on gates, biases, norms (default 0.05)",
    )
    tune.add_argument(
        "--warmup-steps", type=int, default=0, help="linear warm-up steps before the cosine decay (default 0)"
    )
    tune.add_argument(
        "--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine, at most --lr (default 0)"
    )
    tune.add_argument("--label-smoothing", type=float, default=0.1, help="(default 0.1)")
    tune.add_argument(
        "--attention-only-steps",
        type=int,
        default=0,
        metavar="N",
        help="train only the injected blocks (and a replaced head) for the first N steps (default 0)",
    )
    tune.add_argument("--grad-accum", type=int, default=1, metavar="N", help="micro-batches per step (default 1)")
    tune.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    tune.add_argument("--drop-path", type=float, help="stochastic depth rate (timm models: drop_path_rate)")
    tune.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32; bf16 autocast; fp16 autocast with a grad scaler (GPU only) (default fp32)",
    )
    tune.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="same as --precision bf16")
    tune.add_argument("--seed", type=int, default=0, help="data order, augmentation and a new head's init (default 0)")
    augment = tune.add_argument_group("augmentation (timm's create_transform and Mixup; default: timm's)")
    augment.add_argument("--aa", metavar="POLICY", help="AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5")
    augment.add_argument("--reprob", type=float, help="random erasing probability")
    augment.add_argument("--remode", help="random erasing mode: const, rand or pixel")
    augment.add_argument("--recount", type=int, help="random erasing count")
    augment.add_argument("--color-jitter", type=float, help="colour jitter factor")
    augment.add_argument("--hflip", type=float, help="horizontal flip probability")
    augment.add_argument("--vflip", type=float, help="vertical flip probability")
    augment.add_argument("--scale", type=float, nargs=2, metavar=("MIN", "MAX"), help="random resized crop scale")
    augment.add_argument("--ratio", type=float, nargs=2, metavar=("MIN", "MAX"), help="random resized crop ratio")
    augment.add_argument("--train-interpolation", help="interpolation of the train crops (e.g. random, bicubic)")
    augment.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (default 0: off)")
    augment.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (default 0: off)")
    augment.add_argument(
        "--cutmix-minmax", type=float, nargs=2, metavar=("MIN", "MAX"), help="cutmix box ratio range (turns it on)"
    )
    augment.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch (default 1)")
    augment.add_argument(
        "--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on (default 0.5)"
    )
    augment.add_argument("--mixup-mode", choices=MIXUP_MODES, default="batch", help="per batch, pair or element")
    ema = tune.add_argument_group("weight averaging (timm's ModelEmaV3)")
    ema.add_argument(
        "--ema", action="store_true", help="keep an EMA of the weights, evaluate it, write it to NAME.ema.safetensors"
    )
    ema.add_argument("--ema-decay", type=float, default=0.9998, help="(default 0.9998)")
    ema.add_argument("--ema-warmup", action="store_true", help="timm's EMA warm-up of the decay")
    speed = tune.add_argument_group("processes and speed")
    speed.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over all processes (torchrun)")
    speed.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    speed.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    run = tune.add_argument_group("outputs and logs")
    run.add_argument(
        "--keep", choices=KEEP, default="last", help="OUT holds the last epoch or the best by val top-1 (default last)"
    )
    run.add_argument(
        "--log-interval",
        type=int,
        default=50,
        metavar="N",
        help="a line and a metrics row every N steps (default 50; 0: per epoch only)",
    )
    run.add_argument("--tensorboard", metavar="DIR", help="also log to TensorBoard (needs the tensorboard package)")
    run.add_argument(
        "--resume", action="store_true", help="continue the interrupted run that wrote OUT from its last epoch"
    )
    run.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="SETTING",
        help="with --resume: allow this setting to differ from the interrupted run's (e.g. epochs); repeatable",
    )
    run.add_argument("--force", action="store_true", help="replace an existing OUT")
    tune.set_defaults(run=run_training)


def run_evaluation(args: argparse.Namespace) -> int:
    screen = console.err if args.json else console.out
    report = run_eval(
        args.checkpoint,
        args.data,
        arch=args.arch,
        num_classes=args.num_classes,
        img_size=args.img_size,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        precision="bf16" if args.bf16 else "fp32",
        plot=args.plot,
        force=args.force,
        progress=console.TrainingProgress(screen),
    )
    if report.pop("is_main"):
        if args.json:
            console.emit_json(report)
        else:
            console.out.print(
                f"{report['checkpoint']}: top1 {report['top1']:.2%} · top5 {report['top5']:.2%} · "
                f"loss {report['loss']:.4f} on {report['images']} images at {report['input_size'][-1]} px",
                soft_wrap=True,
            )
            if report["plot"]:
                console.out.print(f"confusion matrix: {report['plot']}", soft_wrap=True)
    return 0


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of ``finetune``'s arguments (augmentation flags left out take timm's defaults)."""
    check_img_size(args.img_size)
    augmentation = {
        option: tuple(value) if isinstance(value, list) else value
        for flag, option in AUGMENTATION.items()
        if (value := getattr(args, flag)) is not None
    }
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        attention_lr=args.attention_lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        min_lr=args.min_lr,
        label_smoothing=args.label_smoothing,
        attention_only_steps=args.attention_only_steps,
        precision=args.precision,
        clip_grad=args.clip_grad,
        seed=args.seed,
        workers=args.workers,
        img_size=args.img_size,
        keep=args.keep,
        train_transform=augmentation,
        grad_accum=args.grad_accum,
        drop_path=args.drop_path,
        ema=args.ema,
        ema_decay=args.ema_decay,
        ema_warmup=args.ema_warmup,
        mixup=args.mixup,
        cutmix=args.cutmix,
        cutmix_minmax=None if args.cutmix_minmax is None else tuple(args.cutmix_minmax),
        mixup_prob=args.mixup_prob,
        mixup_switch_prob=args.mixup_switch_prob,
        mixup_mode=args.mixup_mode,
        sync_bn=args.sync_bn,
        channels_last=args.channels_last,
        compile=args.compile,
        log_interval=args.log_interval,
        tensorboard=args.tensorboard,
    )


def run_training(args: argparse.Namespace) -> int:
    screen = console.err if args.json else console.out
    summary = run_finetune(
        args.checkpoint,
        args.data,
        args.output,
        train_config(args),
        arch=args.arch,
        num_classes=args.num_classes,
        resume=args.resume,
        override=tuple(args.override),
        force=args.force,
        device=args.device,
        progress=console.TrainingProgress(screen),
    )
    if summary.pop("is_main"):
        if args.json:
            console.emit_json(summary)
        else:
            before, after = summary["before"], summary["after"]
            console.out.print(
                f"top1 {before['top1']:.2%} -> {after['top1']:.2%} · loss {before['loss']:.4f} -> "
                f"{after['loss']:.4f}; wrote {summary['output']} (epoch {summary['kept_epoch']})",
                soft_wrap=True,
            )
            if "ema_after" in summary:
                ema = summary["ema_after"]
                console.out.print(
                    f"EMA: top1 {ema['top1']:.2%} · loss {ema['loss']:.4f}; wrote {summary['ema_output']} "
                    f"(epoch {summary['ema_kept_epoch']})",
                    soft_wrap=True,
                )
    return 0
