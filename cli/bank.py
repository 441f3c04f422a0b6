"""``productbg bank ...``: make category banks without training.

    productbg bank from-text categories.csv --checkpoint FILE --out bank.safetensors [--template T] [--force]
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``bank`` and its subcommands on the top-level parser."""
    p = sub.add_parser("bank", help="make category banks (from text, no training)",
                       description="Make category banks for Load Category Bank / productbg generate --bank.")
    bsub = p.add_subparsers(dest="bank_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    ft = bsub.add_parser(
        "from-text", help="a bank whose identifiers are the token embeddings of background descriptions",
        description="Each CSV row 'category,background description' (UTF-8; an optional header row "
                    "'category,description') becomes a category whose identifier vectors are the checkpoint's own "
                    "token embeddings of the description (CLIP-L on SD1.5; CLIP-L and OpenCLIP-G on SDXL), so the "
                    "Category Prompt with Mask-Guided Attention gives the described background, confined to the "
                    "background, with no training. At most 75 tokens per description.")
    ft.add_argument("csv", type=Path, metavar="CSV", help="rows 'category,background description'")
    ft.add_argument("--checkpoint", type=Path, required=True,
                    help="the single-file .safetensors SD1.5 or SDXL checkpoint you generate with")
    ft.add_argument("--out", type=Path, required=True, help="the bank to write (.safetensors)")
    ft.add_argument("--template", default=None,
                    help="the bank's prompt template, with {id} once (default 'a product photo on a {id} background')")
    ft.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    ft.set_defaults(func=cmd_from_text)


def cmd_from_text(args: argparse.Namespace) -> int:
    """Write the bank of ``args.csv``'s descriptions for ``args.checkpoint`` atomically to ``args.out``."""
    from ..pipeline.text_bank import bank_from_text, read_categories_csv
    from ..weights.bank_format import check_template
    from . import checks

    checks.input_file(args.csv, "CSV")
    checks.input_file(args.checkpoint, "--checkpoint")
    checks.output_file(args.out, "--out", force=args.force)
    if args.template is not None:
        check_template(args.template)
    where: dict[str, str] = {}
    rows = read_categories_csv(args.csv, where)
    bank = bank_from_text(rows, args.checkpoint, args.template, where)
    dest = bank.save(args.out)
    counts = bank.vector_counts()
    print(f"wrote {dest} ({bank.family} bank, {len(bank)} categories, {min(counts)}..{max(counts)} vectors each)")
    return 0
