"""``attn-inject eval | finetune``: accuracy of a checkpoint on an ImageFolder, and fine-tuning it."""

from __future__ import annotations

import argparse
from typing import Any

from ..finetune.commands import run_eval, run_finetune
from ..finetune.loop import KEEP, TrainConfig, TrainingInterrupted
from . import console
from .arguments import EPILOG, add_checkpoint_arguments


def add_parsers(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="top-1, top-5 and loss of a checkpoint on DIR/val",
        epilog=EPILOG,
        description="Evaluate a patched file (or a plain checkpoint with --arch) on the ImageFolder DIR/val "
        "with the model's timm eval transform. Under torchrun the images are split over the processes.",
    )
    add_checkpoint_arguments(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    evaluate.set_defaults(run=run_evaluation)

    tune = commands.add_parser(
        "finetune",
        help="fine-tune a checkpoint on an ImageFolder (torchrun for several processes)",
        epilog=EPILOG,
        description="Fine-tune CKPT on DIR/train with timm's augmentation, AdamW and a cosine schedule; evaluate "
        "on DIR/val before the first step and after every epoch; write OUT (a patched file that load() and eval "
        "read) and OUT's training state (NAME.train-state.pt, for --resume) after every epoch, atomically. "
        "Under torchrun --nproc-per-node N the same command trains with DistributedDataParallel.",
    )
    add_checkpoint_arguments(tune)
    tune.add_argument("--epochs", type=int, required=True, help="epochs over DIR/train")
    tune.add_argument("--output", required=True, help="the fine-tuned model, NAME.safetensors")
    tune.add_argument("--batch-size", type=int, default=32, help="global batch, split over the processes (default 32)")
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
    tune.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine (default 0)")
    tune.add_argument("--label-smoothing", type=float, default=0.1, help="(default 0.1)")
    tune.add_argument(
        "--attention-only-steps",
        type=int,
        default=0,
        metavar="N",
        help="train only the injected blocks (and a replaced head) for the first N steps (default 0)",
    )
    tune.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    tune.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    tune.add_argument("--seed", type=int, default=0, help="data order, augmentation and a new head's init (default 0)")
    tune.add_argument(
        "--keep",
        choices=KEEP,
        default="last",
        help="OUT holds the last epoch or the best by val top-1 (default last)",
    )
    tune.add_argument(
        "--resume", action="store_true", help="continue the interrupted run that wrote OUT from its last epoch"
    )
    tune.add_argument("--force", action="store_true", help="replace an existing OUT")
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
        progress=console.TrainingProgress(screen),
    )
    if report.pop("is_main"):
        if args.json:
            console.emit_json(report)
        else:
            console.out.print(
                f"{report['checkpoint']}: top1 {report['top1']:.2%} · top5 {report['top5']:.2%} · "
                f"loss {report['loss']:.4f} on {report['images']} images"
            )
    return 0


def run_training(args: argparse.Namespace) -> int:
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        attention_lr=args.attention_lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        min_lr=args.min_lr,
        label_smoothing=args.label_smoothing,
        attention_only_steps=args.attention_only_steps,
        bf16=args.bf16,
        clip_grad=args.clip_grad,
        seed=args.seed,
        workers=args.workers,
        img_size=args.img_size,
        keep=args.keep,
    )
    screen = console.err if args.json else console.out
    try:
        summary = run_finetune(
            args.checkpoint,
            args.data,
            args.output,
            config,
            arch=args.arch,
            num_classes=args.num_classes,
            resume=args.resume,
            force=args.force,
            device=args.device,
            progress=console.TrainingProgress(screen),
        )
    except TrainingInterrupted as exc:
        console.error(console.flag_words(exc.message, exc.field))
        return 130
    if summary.pop("is_main"):
        if args.json:
            console.emit_json(summary)
        else:
            before, after = summary["before"], summary["after"]
            console.out.print(
                f"top1 {before['top1']:.2%} -> {after['top1']:.2%} · loss {before['loss']:.4f} -> "
                f"{after['loss']:.4f}; wrote {summary['output']} (epoch {summary['kept_epoch']})"
            )
    return 0
