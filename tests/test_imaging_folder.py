"""Product folders: categories from sub-folders or a CSV, stable order, clear errors, transparent images."""
import numpy as np
import pytest
from PIL import Image

from productbg.imaging import folder as fd


def write_png(path, mode="RGB", size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


@pytest.fixture
def products(tmp_path):
    """shoes/B.png, shoes/a.png, bags/x.jpg, loose.png, .hidden/z.png, notes.txt"""
    for rel in ("shoes/B.png", "shoes/a.png", "bags/deep/x.png", "loose.png", ".hidden/z.png"):
        write_png(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_subfolder_categories_and_stable_order(products):
    """Category = first folder below the root; order = case-insensitive relative path; hidden skipped."""
    entries = fd.list_products(products)
    assert [(e.category, e.name) for e in entries] == [
        ("bags", "x.png"), ("", "loose.png"), ("shoes", "a.png"), ("shoes", "B.png")]
    assert all(e.path.is_absolute() and e.path.is_file() for e in entries)
    assert fd.list_products(str(products)) == entries


def test_csv_categories_keep_row_order(products):
    """A CSV gives categories in its own order; blank lines are skipped; a BOM header is fine."""
    (products / "list.csv").write_text("\ufeffpath,category,sku\nshoes/a.png,sneakers,1\n\nloose.png,misc,2\n",
                                       encoding="utf-8")
    entries = fd.list_products(products, "list.csv")
    assert [(e.category, e.name) for e in entries] == [("sneakers", "a.png"), ("misc", "loose.png")]
    (products / "other.csv").write_text("file;cat\n", encoding="utf-8")
    with pytest.raises(fd.ProductFolderError, match=r"no column 'path', 'category'.*\['file;cat'\]"):
        fd.list_products(products, "other.csv")
    (products / "bad.csv").write_text("path,category\nmissing.png,x\n", encoding="utf-8")
    with pytest.raises(fd.ProductFolderError, match="line 2: image not found"):
        fd.list_products(products, "bad.csv")


def test_missing_folder_csv_and_empty_folder(tmp_path):
    with pytest.raises(fd.ProductFolderError, match="not found"):
        fd.list_products(tmp_path / "nope")
    with pytest.raises(fd.ProductFolderError, match="no product folder given"):
        fd.list_products("  ")
    with pytest.raises(fd.ProductFolderError, match="CSV not found"):
        fd.list_products(tmp_path, "missing.csv")
    with pytest.raises(fd.ProductFolderError, match="no product images"):
        fd.list_products(tmp_path)


def test_load_image_alpha_palette_and_rgb(tmp_path):
    """RGBA and palette transparency give an alpha; RGB gives None; unreadable files raise clearly."""
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0], rgba[2:4, 2:6, 3] = 255, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb, alpha = fd.load_image(tmp_path / "a.png")
    assert rgb.shape == (6, 8, 3) and alpha.shape == (6, 8) and alpha.sum() == 8 and rgb[0, 0, 0] == 1.0
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    assert fd.load_image(tmp_path / "p.png")[1] is not None
    assert fd.load_image(write_png(tmp_path / "c.png"))[1] is None
    (tmp_path / "broken.png").write_bytes(b"nope")
    with pytest.raises(fd.ProductFolderError, match="cannot read image"):
        fd.load_image(tmp_path / "broken.png")
