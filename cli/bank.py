"""``productbg bank ...``: make category banks without training, and curate them.

    productbg bank from-text categories.csv --checkpoint FILE --out bank.safetensors [--template T] [--force]
        (FILE: an SD1.5 / SDXL checkpoint, or Flux.1's T5-XXL text encoder, e.g. t5xxl_fp8_e4m3fn.safetensors)
    productbg bank list BANK [--json]
    productbg bank rename BANK OLD NEW [--out OUT] [--force]
    productbg bank remove BANK NAME [NAME ...] [--out OUT] [--force]
    productbg bank merge BANK BANK [BANK ...] --out OUT [--on-conflict error|keep|replace] [--template T] [--force]
    productbg bank preview BANK CATEGORY IMAGE | --remove

Every write is atomic (a temp file beside the destination, then a rename): a failed command leaves every file as
it was. ``rename`` and ``remove`` rewrite BANK in place unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from ..pipeline.text_bank import bank_from_text, read_categories_csv
from ..weights.bank import load_bank
from ..weights.bank_format import ENCODER_WIDTHS, check_template
from ..weights.bank_merge import MergeConflictError, merge_banks
from ..weights.bank_names import check_name
from ..weights.bank_previews import has_previews, copy_previews, remove_preview, write_preview
from . import checks
from .errors import CliError


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``bank`` and its subcommands on the top-level parser."""
    p = sub.add_parser("bank", help="make category banks (from text, no training) and curate them",
                       description="Make and curate category banks for Load Category Bank / productbg generate "
                                   "--bank: from-text, list, rename, remove, merge.")
    bsub = p.add_subparsers(dest="bank_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    ft = bsub.add_parser(
        "from-text", help="a bank whose identifiers are the token embeddings of background descriptions",
        description="Each CSV row 'category,background description' (UTF-8; an optional header row "
                    "'category,description') becomes a category whose identifier vectors are the checkpoint's own "
                    "token embeddings of the description (CLIP-L on SD1.5; CLIP-L and OpenCLIP-G on SDXL; T5-XXL "
                    "on Flux.1, as ComfyUI's model holds them: fp8-rounded for an fp8 file), so the Category Prompt "
                    "with Mask-Guided Attention gives the described background, confined to the background, with no "
                    "training. At most 75 tokens per description.")
    ft.add_argument("csv", type=Path, metavar="CSV", help="rows 'category,background description'")
    ft.add_argument("--checkpoint", type=Path, required=True,
                    help="the single-file .safetensors SD1.5 or SDXL checkpoint you generate with; for Flux.1 its "
                         "T5-XXL text encoder (models/text_encoders/t5xxl_fp16.safetensors or "
                         "t5xxl_fp8_e4m3fn.safetensors) or a Flux single file that bundles it")
    ft.add_argument("--out", type=Path, required=True, help="the bank to write (.safetensors)")
    ft.add_argument("--template", default=None,
                    help="the bank's prompt template, with {id} once (default 'a product photo on a {id} background')")
    ft.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    ft.set_defaults(func=cmd_from_text)
    _add_curation_parsers(bsub)


def _add_curation_parsers(bsub: argparse._SubParsersAction) -> None:
    ls = bsub.add_parser("list", help="the categories of a bank (reads only the file's header)",
                         description="Print a bank's family, template and categories (vector count, LoRA, "
                                     "preview), reading only the file's header.")
    ls.add_argument("bank", type=Path, metavar="BANK", help="a category bank (.safetensors)")
    ls.add_argument("--json", action="store_true", help="one JSON object instead of text")
    ls.set_defaults(func=cmd_list)

    rn = bsub.add_parser("rename", help="rename a category", description="Rename one category of BANK (its "
                         "vectors, LoRA and preview stay). OLD may differ in letter case; NEW must be free.")
    rn.add_argument("bank", type=Path, metavar="BANK", help="a category bank (.safetensors)")
    rn.add_argument("old", metavar="OLD", help="the category's name")
    rn.add_argument("new", metavar="NEW", help="its new name")
    _out_options(rn, "the bank to write (default: BANK itself, rewritten atomically)")
    rn.set_defaults(func=cmd_rename)

    rm = bsub.add_parser("remove", help="remove categories", description="Remove categories from BANK. Every "
                         "name must be in the bank (else nothing is written).")
    rm.add_argument("bank", type=Path, metavar="BANK", help="a category bank (.safetensors)")
    rm.add_argument("names", nargs="+", metavar="NAME", help="categories to remove")
    _out_options(rm, "the bank to write (default: BANK itself, rewritten atomically)")
    rm.set_defaults(func=cmd_remove)

    mg = bsub.add_parser(
        "merge", help="merge banks of one family into a new bank",
        description="Merge banks of one family (sd15, sdxl, or tiny of one width) into --out: every category of "
                    "every bank, in order, vectors bit for bit. Families are never mixed. A category in several "
                    "banks with different vectors, LoRA or preview (or names that differ only in letter case) is "
                    "a conflict: by default every conflict is listed, the exit status is 1 and nothing is written; "
                    "--on-conflict keep|replace resolves them (first bank's / last bank's). Different prompt "
                    "templates need --template.")
    mg.add_argument("banks", nargs="+", type=Path, metavar="BANK", help="two or more category banks")
    mg.add_argument("--out", type=Path, required=True, help="the merged bank to write (.safetensors)")
    mg.add_argument("--on-conflict", choices=("error", "keep", "replace"), default="error",
                    help="what a conflict does: error (default: nothing written, exit 1), keep (first bank wins), "
                         "replace (last bank wins)")
    mg.add_argument("--template", default=None, help="the merged bank's prompt template, with {id} once "
                    "(default: the banks' common template)")
    mg.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    mg.set_defaults(func=cmd_merge)

    pv = bsub.add_parser("preview", help="set (or remove) a category's preview thumbnail",
                         description="Set the preview thumbnail the ComfyUI category list shows for CATEGORY: IMAGE "
                                     "is shrunk to fit 128 px and written as PNG into the folder beside the bank "
                                     "(BANK.previews/). The bank file itself is not changed.")
    pv.add_argument("bank", type=Path, metavar="BANK", help="a category bank (.safetensors)")
    pv.add_argument("category", metavar="CATEGORY", help="the category's name")
    pv.add_argument("image", type=Path, nargs="?", metavar="IMAGE", help="any image PIL reads")
    pv.add_argument("--remove", action="store_true", help="remove the category's preview instead")
    pv.set_defaults(func=cmd_preview)


def _out_options(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--out", type=Path, default=None, help=out_help)
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def cmd_from_text(args: argparse.Namespace) -> int:
    """Write the bank of ``args.csv``'s descriptions for ``args.checkpoint`` atomically to ``args.out``."""
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


def _open(path: Path):
    checks.input_file(path, "BANK")
    return load_bank(path)


def bank_summary(bank, path: Path) -> dict:
    """The JSON form of ``productbg bank list``: the bank's settings and every category, from the header."""
    loras, counts = bank.loras, bank.vector_counts()
    previews = has_previews(path, bank.names)
    # the width of the bank's (first) encoder's vectors: clip_l's, or t5xxl's on a flux bank
    width = bank.width if bank.encoders[0] == "clip_l" else ENCODER_WIDTHS[bank.encoders[0]]
    return {
        "file": str(path), "family": bank.family, "width": width, "vectors_per_id": bank.vectors_per_id,
        "template": bank.template, "dtype": str(bank.dtype).replace("torch.", ""), "count": len(bank),
        "categories": [{"name": n, "vectors": c,
                        "lora": {"file": loras[n].file, "strength": loras[n].strength} if n in loras else None,
                        "preview": p}
                       for n, c, p in zip(bank.names, counts, previews)],
    }


def cmd_list(args: argparse.Namespace) -> int:
    """Print the bank's categories (text or ``--json``); only the header is read."""
    with _open(args.bank) as bank:
        info = bank_summary(bank, args.bank)
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=1))
        return 0
    width = f" width {info['width']}" if info["family"] == "tiny" else ""
    print(f"{args.bank}: {info['family']}{width} bank, {info['count']} categories, up to {info['vectors_per_id']} "
          f"vectors each, {info['dtype']}, template {info['template']!r}")
    for c in info["categories"]:
        extra = f"\tlora {c['lora']['file']} x{c['lora']['strength']:g}" if c["lora"] else ""
        extra += "\tpreview" if c["preview"] else ""
        print(f"{c['name']}\t{c['vectors']} vector{'s' if c['vectors'] != 1 else ''}{extra}")
    return 0


def _destination(args: argparse.Namespace) -> Path:
    if args.out is None:
        return checks.output_file(args.bank, "BANK", force=True)
    same = args.out.exists() and args.out.resolve() == args.bank.resolve()
    return checks.output_file(args.out, "--out", force=args.force or same)


def cmd_rename(args: argparse.Namespace) -> int:
    """Rename one category and write the bank atomically."""
    bank = _open(args.bank)
    dest = _destination(args)
    with bank:
        stored, new = bank.resolve(args.old), check_name(args.new)
        bank.rename(stored, new)
        bank.save(dest)
        _carry_previews(args.bank, dest, {n: (n if n != new else stored) for n in bank.names}, [stored])
    print(f"renamed {stored!r} to {new!r}: wrote {dest} ({len(bank)} categories)")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    """Remove categories (every one must exist) and write the bank atomically."""
    bank = _open(args.bank)
    dest = _destination(args)
    with bank:
        stored = [bank.resolve(n) for n in args.names]  # every name first: a miss writes nothing
        for name in dict.fromkeys(stored):
            bank.remove(name)
        bank.save(dest)
        _carry_previews(args.bank, dest, {n: n for n in bank.names}, stored)
    print(f"removed {', '.join(repr(n) for n in dict.fromkeys(stored))}: wrote {dest} ({len(bank)} categories left)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge the banks into ``--out``; conflicts are listed on stderr with exit status 1 and nothing written."""
    if len(args.banks) < 2:
        raise CliError("give at least two banks to merge")
    if args.template is not None:
        check_template(args.template)
    checks.output_file(args.out, "--out", force=args.force)
    banks = [_open(p) for p in args.banks]
    try:
        try:
            merged, report = merge_banks(banks, args.on_conflict, args.template)
        except MergeConflictError as e:
            for line in e.conflicts:
                print(f"productbg bank merge: conflict: {line}", file=sys.stderr)
            print(f"productbg bank merge: error: {len(e.conflicts)} conflict(s); nothing written (resolve them with "
                  "--on-conflict keep|replace, or rename / remove the categories first)", file=sys.stderr)
            return 1
        dest = merged.save(args.out)
        copy_previews([(b.path, old, new) for new, (b, old) in report.origin.items()], dest)
    finally:
        for b in banks:
            b.close()
    for line in report.resolved:
        print(f"resolved: {line}")
    taken = ", ".join(f"{n} from {label}" for label, n in report.added.items())
    same = f"; {len(report.identical)} identical duplicates merged" if report.identical else ""
    print(f"wrote {dest} ({merged.family} bank, {len(merged)} categories: {taken}{same})")
    return 0


def _carry_previews(src: Path, dest: Path, kept: dict[str, str], dropped: list[str]) -> None:
    """After ``rename`` / ``remove`` wrote ``dest``: its previews are those of ``src`` for the kept categories
    (new name -> name in ``src``); in place, the previews of renamed-away or removed names go."""
    moved = {new: old for new, old in kept.items() if new != old or src.resolve() != dest.resolve()}
    copy_previews([(src, old, new) for new, old in moved.items()], dest)
    if src.resolve() == dest.resolve():
        for name in dropped:
            if name not in kept:
                remove_preview(dest, name)


def cmd_preview(args: argparse.Namespace) -> int:
    """Write (or ``--remove``) a category's preview thumbnail beside the bank."""
    if (args.image is None) == (not args.remove):
        raise CliError("give IMAGE, or --remove (not both)")
    with _open(args.bank) as bank:
        name = bank.resolve(args.category)
    if args.remove:
        print(f"{'removed' if remove_preview(args.bank, name) else 'there was no'} preview of {name!r}")
        return 0
    checks.input_image(args.image, "IMAGE")

    with Image.open(args.image) as im:
        dest = write_preview(args.bank, name, im)
    print(f"wrote the preview of {name!r}: {dest}")
    return 0
