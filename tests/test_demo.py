"""The foundation demo: tiny pipeline, identifier confined in every layer, product pasted back, PNG written."""
import torch

from productbg.cli import main
from productbg.demo import result_mask, run_demo


def test_demo_confines_identifier_and_pastes_product_back():
    result = run_demo(steps=2)
    assert len(result["maps"]) == 7
    for m in result["maps"].values():
        cells = result_mask(result, m.shape)
        assert cells.any() and m[cells].max() == 0 and m[~cells].max() > 0
    inside = result["mask"] > 0.5
    assert torch.equal(result["composite"][:, inside], result["product"][:, inside])


def test_demo_cli_writes_png(tmp_path):
    out = tmp_path / "sheet" / "demo.png"
    assert main(["demo", "--steps", "1", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in out.parent.iterdir()] == ["demo.png"]  # no temp file left behind
