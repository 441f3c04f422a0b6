"""The category list's routes on the real ComfyUI 0.3.75 server (issue 25 part 3): only files inside the
registered bank folders; every abuse case a 4xx JSON, never a traceback or a file from outside."""
import json
import os
import time
import urllib.error
import urllib.request

import pytest

import comfy_harness

pytestmark = pytest.mark.comfyui

NAMES = ["运动鞋", "Coffee Mug", "Leather Bag", "shoes"]


@pytest.fixture(scope="module")
def setup(comfyui_dir, tmp_path_factory):
    """A server whose bank folder holds good, bad and malicious entries; a secret outside the folder."""
    from safetensors.torch import save_file
    import torch

    from productbg.weights.bank_previews import write_preview
    from weight_samples import example_bank, example_style_encoder
    from productbg.weights.style_encoder import save_style_encoder

    root = tmp_path_factory.mktemp("routes")
    banks, outside = root / "banks", root / "outside"
    (banks / "sub").mkdir(parents=True)
    outside.mkdir()
    bank = example_bank(NAMES)
    bank.save(banks / "good.safetensors")
    write_preview(banks / "good.safetensors", "运动鞋", torch.full((40, 60, 3), 0.5))
    example_bank(["nested"]).save(banks / "sub" / "nested.safetensors")
    example_bank(["secret"]).save(outside / "secret.safetensors")
    write_preview(outside / "secret.safetensors", "secret", torch.zeros(8, 8, 3))
    os.symlink(outside / "secret.safetensors", banks / "escape.safetensors")   # a symlink out of the folder
    example_bank(["linked"]).save(banks / "linked.safetensors")               # a bank whose previews folder
    os.symlink(outside / "secret.previews", banks / "linked.previews")         # is a symlink out
    save_style_encoder(example_style_encoder("ip-adapter_sd15", clip_width=768), banks / "style.safetensors")
    data = (banks / "good.safetensors").read_bytes()
    (banks / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (banks / "garbage.safetensors").write_bytes(b"\xff" * 64)
    save_file({"x": torch.zeros(2)}, str(banks / "plain.safetensors"))
    server = comfy_harness.ComfyServer(comfyui_dir, comfy_harness.REPO_ROOT, root / "server",
                                       model_paths={"productbg_banks": str(banks)})
    server.start()
    yield server, banks, outside
    server.stop()


def get(server, path_and_query: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET with the path and query sent exactly as written."""
    try:
        with urllib.request.urlopen(server.url + path_and_query, timeout=60) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def error(server, path_and_query: str, status: int) -> str:
    code, ctype, body = get(server, path_and_query)
    assert code == status, (path_and_query, code, body[:300])
    assert ctype.startswith("application/json"), (path_and_query, ctype)
    text = body.decode()
    assert "Traceback" not in text and "secret" not in json.loads(text).get("categories", [])
    return json.loads(text)["error"]


def test_lists_banks_and_categories_with_previews(setup):
    server, _, _ = setup
    for prefix in ("", "/api"):
        code, _, body = get(server, prefix + "/productbg/banks")
        assert code == 200 and {"good.safetensors", "sub/nested.safetensors"} <= set(json.loads(body)["banks"])
        code, _, body = get(server, prefix + "/productbg/banks/categories?bank=good.safetensors")
        info = json.loads(body)
        assert code == 200 and info["categories"] == NAMES and info["family"] == "sd15" and info["count"] == 4
        assert info["previews"] == [True, False, False, False] and info["bank"] == "good.safetensors"
    code, _, body = get(server, "/productbg/banks/categories?bank=sub%2Fnested.safetensors")
    assert code == 200 and json.loads(body)["categories"] == ["nested"]


def test_preview_is_the_png_beside_the_bank(setup):
    from productbg.weights.bank_previews import read_preview

    server, banks, _ = setup
    quoted = urllib.request.quote("运动鞋")
    code, ctype, body = get(server, f"/api/productbg/banks/preview?bank=good.safetensors&category={quoted}")
    assert code == 200 and ctype == "image/png" and body == read_preview(banks / "good.safetensors", "运动鞋")
    assert "no preview" in error(server, "/productbg/banks/preview?bank=good.safetensors&category=shoes", 404)
    assert "no category" in error(server, "/productbg/banks/preview?bank=good.safetensors&category=boots", 404)
    assert "category" in error(server, "/productbg/banks/preview?bank=good.safetensors", 400)


@pytest.mark.parametrize("query, status", [
    ("bank=../outside/secret.safetensors", 400),
    ("bank=..%2Foutside%2Fsecret.safetensors", 400),              # URL-encoded ../
    ("bank=%2e%2e%2foutside%2fsecret.safetensors", 400),          # URL-encoded dots too
    ("bank=%252e%252e%252foutside%252fsecret.safetensors", 404),  # double-encoded: a name, and not a listed one
    ("bank=sub%2F..%2F..%2Foutside%2Fsecret.safetensors", 400),
    ("bank=..%5Coutside%5Csecret.safetensors", 400),              # backslashes
    ("bank=%2Fetc%2Fpasswd", 400),                                # absolute
    ("bank=" + urllib.request.quote("/tmp/x.safetensors"), 400),
    ("bank=good.safetensors%00.png", 400),                        # NUL
    ("bank=", 400),
    ("", 400),
    ("bank=nope.safetensors", 404),
    ("bank=good", 400),                                           # not a .safetensors name
    ("bank=escape.safetensors", 403),                             # a symlink out of the folder
    ("bank=style.safetensors", 422),                              # a style encoder, not a bank
    ("bank=plain.safetensors", 422),
    ("bank=truncated.safetensors", 422),
    ("bank=garbage.safetensors", 422),
    ("bank=" + "a" * 5000 + ".safetensors", 400),
])
def test_abuse_is_a_4xx_json(setup, query, status):
    server, _, _ = setup
    for route in ("categories", "preview"):
        extra = "&category=secret" if route == "preview" else ""
        message = error(server, f"/productbg/banks/{route}?{query}{extra}", status)
        assert message and "\n" not in message


def test_symlinked_previews_folder_is_not_served(setup):
    server, _, _ = setup
    code, _, body = get(server, "/productbg/banks/categories?bank=linked.safetensors")
    assert code == 200 and json.loads(body)["previews"] == [False]
    error(server, "/productbg/banks/preview?bank=linked.safetensors&category=linked", 404)


def test_unknown_productbg_paths_are_json_404(setup):
    server, _, _ = setup
    for path in ("/productbg/nope", "/productbg/banks/good.safetensors", "/api/productbg/banks/%2e%2e/%2e%2e/etc"):
        error(server, path, 404)


def test_a_changed_bank_is_listed_again(setup):
    """The list follows the file (ComfyUI's refresh re-reads it): a rewritten bank shows its new names."""
    from weight_samples import example_bank

    server, banks, _ = setup
    path = banks / "changing.safetensors"
    example_bank(["one"]).save(path)
    os.utime(banks)  # ComfyUI caches folder listings by the folder's mtime
    code, _, body = get(server, "/productbg/banks/categories?bank=changing.safetensors")
    assert code == 200 and json.loads(body)["categories"] == ["one"]
    time.sleep(0.01)
    example_bank(["one", "two"]).save(path)
    code, _, body = get(server, "/productbg/banks/categories?bank=changing.safetensors")
    assert code == 200 and json.loads(body)["categories"] == ["one", "two"]


def test_5000_categories_listed(setup):
    """A 5,000-category bank of Chinese and Latin names comes back whole (the timing is bench/bank_list.py's)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from bank_scale import build

    server, banks, _ = setup
    import torch

    names = build(banks / "big.safetensors", 5000, 1, torch.float16)
    os.utime(banks)
    code, _, body = get(server, "/productbg/banks/categories?bank=big.safetensors")
    assert code == 200 and json.loads(body)["categories"] == names
