"""``productbg weights ...``: inspect weight files and convert LoRAs.

    productbg weights inspect FILE [--json]
    productbg weights convert-lora IN OUT --to kohya|peft [--force]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..weights.errors import WeightsError


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``weights`` and its subcommands on the top-level parser."""
    p = sub.add_parser("weights", help="inspect and convert productbg weight files",
                       description="Inspect category banks, style encoders (IP-Adapter) and LoRAs; convert LoRAs "
                                   "between the peft/diffusers and kohya (ComfyUI) layouts.")
    wsub = p.add_subparsers(dest="weights_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    ins = wsub.add_parser("inspect", help="say what a .safetensors weight file is")
    ins.add_argument("file", type=Path)
    ins.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ins.set_defaults(func=cmd_inspect)

    conv = wsub.add_parser("convert-lora", help="convert a LoRA between peft/diffusers and kohya layouts")
    conv.add_argument("input", type=Path)
    conv.add_argument("output", type=Path)
    conv.add_argument("--to", required=True, choices=["kohya", "peft"],
                      help="kohya: for ComfyUI's LoraLoader (models/loras); peft: for diffusers")
    conv.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    conv.set_defaults(func=cmd_convert_lora)


def _cli_error(message: str) -> Exception:
    from .errors import CliError

    return CliError(" ".join(message.split("\n")))


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print what ``args.file`` is."""
    from ..weights.describe import describe_file

    from . import checks

    checks.input_file(args.file, "FILE")
    try:
        report = describe_file(args.file)
    except WeightsError as e:
        raise _cli_error(str(e)) from None
    _print(json.dumps(report.to_json(), ensure_ascii=False) if args.json else report.render())
    return 0


def _print(text: str) -> None:
    """Print, degrading characters the terminal cannot show (e.g. Chinese names on a cp1252 console)."""
    try:
        print(text)
    except UnicodeEncodeError:
        enc = sys.stdout.encoding or "ascii"
        print(text.encode(enc, "backslashreplace").decode(enc))


def cmd_convert_lora(args: argparse.Namespace) -> int:
    """Convert ``args.input`` to the ``args.to`` layout, writing ``args.output`` atomically."""
    from ..weights.lora import convert_lora_file, read_lora

    from . import checks

    checks.input_file(args.input, "INPUT")
    if args.output.resolve() == args.input.resolve():
        raise _cli_error(f"OUTPUT {args.output} is the INPUT file; write the converted LoRA to a new file")
    checks.output_file(args.output, "OUTPUT", force=args.force)
    try:
        dest = convert_lora_file(args.input, args.output, args.to)
        count = len(read_lora(dest).modules)
    except WeightsError as e:
        raise _cli_error(str(e)) from None
    print(f"wrote {dest} ({args.to}, {count} modules)")
    return 0
