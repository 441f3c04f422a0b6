"""``productbg weights ...``: inspect weight files, convert LoRAs, export a category as an embedding.

    productbg weights inspect FILE [--json]
    productbg weights convert-lora IN OUT --to kohya|peft [--force]
    productbg weights export-embedding BANK CATEGORY OUT [--force]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..weights.describe import describe_file
from ..weights.embedding import check_prompt_name, export_embedding
from ..weights.errors import WeightsError
from ..weights.lora import convert_lora_file, read_lora
from . import checks
from .errors import CliError


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

    exp = wsub.add_parser("export-embedding", help="write one category of a bank as a standard embedding file",
                          description="Write one category's identifier vectors as a textual-inversion embedding "
                                      "(SD1.5: emb_params; SDXL: clip_l + clip_g) that ComfyUI loads from "
                                      "models/embeddings with embedding:NAME in a prompt (NAME = OUT's file name).")
    exp.add_argument("bank", type=Path, metavar="BANK", help="a category bank (.safetensors, family sd15 or sdxl)")
    exp.add_argument("category", metavar="CATEGORY", help="the category (letter case may differ)")
    exp.add_argument("output", type=Path, metavar="OUT", help="NAME.safetensors, one word (no spaces)")
    exp.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    exp.set_defaults(func=cmd_export_embedding)


def _cli_error(message: str) -> Exception:
    return CliError(" ".join(message.split("\n")))


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print what ``args.file`` is."""
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


def cmd_export_embedding(args: argparse.Namespace) -> int:
    """Write category ``args.category`` of ``args.bank`` to ``args.output`` as an embedding, atomically."""
    checks.input_file(args.bank, "BANK")
    if args.output.resolve() == args.bank.resolve():
        raise _cli_error(f"OUT {args.output} is the BANK file; write the embedding to a new file")
    try:
        check_prompt_name(args.output)
    except WeightsError as e:
        raise _cli_error(f"OUT {e}") from None
    checks.output_file(args.output, "OUT", force=args.force)
    try:
        done = export_embedding(args.bank, args.category, args.output)
    except WeightsError as e:
        raise _cli_error(str(e)) from None
    shapes = ", ".join(f"{k} {list(v)}" for k, v in done.shapes.items())
    _print(f"wrote {done.path} ({done.family} embedding of '{done.category}': {shapes})\n"
           f"ComfyUI: put it in models/embeddings/ and write {done.prompt_name} in the prompt, e.g. "
           f"\"{done.prompt_example}\"")
    return 0
