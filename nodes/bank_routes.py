"""Small read-only HTTP routes on ComfyUI's ``PromptServer`` for the category list of the frontend (``web/``).

    GET /productbg/banks                                   {"banks": [file names in models/productbg/banks]}
    GET /productbg/banks/categories?bank=NAME              {"bank", "family", "count", "vectors_per_id",
                                                            "template", "categories": [...], "previews": [bool]}
    GET /productbg/banks/preview?bank=NAME&category=CAT    the category's preview thumbnail (image/png)

(ComfyUI serves each under ``/api`` too.) A ``bank`` is a file name exactly as Load Category Bank lists it;
anything else is refused before the file system is touched: traversal (``..``, absolute paths, backslashes,
NUL — URL-decoded once by the server, so ``%2e%2e%2f`` is ``../``), names that are not listed (404), files or
preview folders whose real path (symlinks resolved) leaves the registered bank folders (403), non-bank and
truncated files (422). Every refusal is a 4xx JSON ``{"error": message}``; an unexpected failure is a 500 JSON
with no traceback (it is logged). Listing reads only the file's header (cached by file identity and mtime, so a
changed bank is read again), never its vectors.
"""
from __future__ import annotations

import logging
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from ..weights.bank_format import parse_bank_header
from ..weights.bank_names import find_name, index_names
from ..weights.bank_previews import previews_dir, has_previews, read_preview
from ..weights.errors import WeightsError
from ..weights.safefile import read_header
from .folders import register_model_folders

PREFIX = "/productbg/banks"
BANKS = "productbg_banks"
MAX_NAME = 1024
_CACHE: "OrderedDict[tuple, dict]" = OrderedDict()
CACHE_SIZE = 16
log = logging.getLogger("productbg")


class RouteError(Exception):
    """A refused request: HTTP ``status`` and a one-line message for the JSON body (the route handler maps it to
    that response; anything else is a 500)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------------------------------------- checks
def _check_text(value: Any, what: str, limit: int = MAX_NAME) -> str:
    if not isinstance(value, str) or not value:
        raise RouteError(400, f"give the {what} (query parameter '{what}')")
    if len(value) > limit or "\x00" in value:
        raise RouteError(400, f"the {what} is too long or holds a NUL character")
    return value


def _check_bank_name(name: Any) -> str:
    name = _check_text(name, "bank")
    parts = name.replace("\\", "/").split("/")
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts or "." in parts \
            or "" in parts:
        raise RouteError(400, f"{name[:80]!r} is not a bank file name (no paths: use a name Load Category Bank lists)")
    if not name.lower().endswith(".safetensors"):
        raise RouteError(400, f"{name[:80]!r} is not a .safetensors bank")
    return name


def _inside(path: str, roots: list[str]) -> str | None:
    """The root (real path) that holds ``path``'s real path, or None."""
    real = os.path.realpath(path)
    for root in roots:
        if os.path.commonpath([real, root]) == root:
            return root
    return None


def bank_file(name: Any) -> tuple[Path, str]:
    """The real path of a listed bank file inside a registered bank folder, and that folder's real path."""
    # ComfyUI's own module: there only inside ComfyUI, and this module must import without it
    import folder_paths

    name = _check_bank_name(name)
    register_model_folders()
    if name not in folder_paths.get_filename_list(BANKS):
        raise RouteError(404, f"no bank named {name[:80]!r} in models/productbg/banks (refresh the page after adding one)")
    roots = [os.path.realpath(p) for p in folder_paths.get_folder_paths(BANKS) if os.path.isdir(p)]
    for folder in folder_paths.get_folder_paths(BANKS):
        candidate = os.path.join(folder, name)
        if not os.path.lexists(candidate):
            continue
        root = _inside(candidate, roots)
        if root is None:
            raise RouteError(403, f"{name[:80]!r} points outside the bank folders")
        real = Path(os.path.realpath(candidate))
        if not real.is_file():
            raise RouteError(404, f"{name[:80]!r} is not a file")
        return real, root
    raise RouteError(404, f"no bank named {name[:80]!r}")


def _header_info(path: Path) -> dict:
    """The bank's settings and names from its header, cached by file identity (a changed file is read again)."""
    try:
        st = path.stat()
    except OSError:
        raise RouteError(404, f"{path.name}: cannot be read") from None
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    try:
        meta, names, _ = parse_bank_header(read_header(path))
    except WeightsError as e:
        raise RouteError(422, " ".join(str(e).split())[:400]) from None
    info = {"family": meta.family, "count": len(names), "vectors_per_id": meta.vectors_per_id,
            "template": meta.template, "categories": names}
    _CACHE[key] = info
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return info


def _previews_folder(path: Path, root: str) -> Path | None:
    """The bank's preview folder when it exists and stays inside the bank folder (symlinks resolved)."""
    folder = previews_dir(path)
    if not folder.is_dir() or _inside(str(folder), [root]) is None:
        return None
    return folder


# ---------------------------------------------------------------------------------------------- payloads
def banks_payload(query: Any = None) -> dict:
    # ComfyUI's own module: there only inside ComfyUI, and this module must import without it
    import folder_paths

    register_model_folders()
    return {"banks": list(folder_paths.get_filename_list(BANKS))}


def bank_listing(path: Path, root: str) -> dict:
    """What the category list shows for a bank file: its header's settings and names, and which categories have
    a preview (one read of the preview folder). Reads no tensor data."""
    info = _header_info(path)
    previews = has_previews(path, info["categories"]) if _previews_folder(path, root) else [False] * info["count"]
    return {**info, "previews": previews}


def categories_payload(query: Any) -> dict:
    path, root = bank_file(query.get("bank"))
    return {"bank": query.get("bank"), **bank_listing(path, root)}


def preview_png(query: Any) -> bytes:
    path, root = bank_file(query.get("bank"))
    category = _check_text(query.get("category"), "category")
    names = _header_info(path)["categories"]
    try:
        stored = find_name(category, *index_names(names))
    except WeightsError as e:
        raise RouteError(400, str(e)) from None
    if stored is None:
        raise RouteError(404, f"no category {category[:80]!r} in {path.name}")
    data = read_preview(path, stored) if _previews_folder(path, root) else None
    if data is None:
        raise RouteError(404, f"category {stored!r} has no preview")
    return data


# ---------------------------------------------------------------------------------------------- aiohttp
def _handler(web: Any, make: Callable[[Any], Any]):
    """An aiohttp handler around ``make(query)`` (``web`` is the ``aiohttp.web`` module ComfyUI's server runs on)."""
    async def handle(request):
        try:
            result = make(request.rel_url.query)
            if isinstance(result, bytes):
                return web.Response(body=result, content_type="image/png", headers={"Cache-Control": "no-cache"})
            return web.json_response(result, headers={"Cache-Control": "no-cache"})
        except RouteError as e:
            return web.json_response({"error": e.message}, status=e.status)
        except Exception:  # never a traceback to the client; the server log has it
            log.exception("productbg: %s failed", request.rel_url.path)
            return web.json_response({"error": "internal error in productbg (see the ComfyUI log)"}, status=500)
    return handle


def _not_found(web: Any):
    async def handle(request):
        return web.json_response({"error": f"no such productbg route: {request.rel_url.path[:120]}"}, status=404)
    return handle


def register_routes() -> bool:
    """Add the routes to ``PromptServer.instance.routes`` when this runs inside a ComfyUI server that has not
    set up its routes yet; False (and nothing done) elsewhere — plain Python, tests, a second call."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    routes = getattr(instance, "routes", None)
    web = getattr(server, "web", None) or sys.modules.get("aiohttp.web")  # the server's own aiohttp, no import
    if routes is None or web is None or getattr(instance, "_productbg_routes", False):
        return False
    routes.get(PREFIX)(_handler(web, banks_payload))
    routes.get(PREFIX + "/categories")(_handler(web, categories_payload))
    routes.get(PREFIX + "/preview")(_handler(web, preview_png))
    routes.get("/productbg/{tail:.*}")(_not_found(web))
    instance._productbg_routes = True
    return True
