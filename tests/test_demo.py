"""``productbg demo`` on the embedded demo model, and the recipe that builds that model."""
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from productbg.cli import main
from productbg.cli.demo import CELL, LABEL_H, DEMO_CATEGORIES, DEMO_REFERENCES, PRODUCT_SEEDS
from productbg.pipeline.embedded import DEMO_MODEL, demo_recipe, load_demo_pipeline
from productbg.training.demo_model import Recipe, train

MAX_BYTES = 25 * 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_shipped_model_is_small_and_matches_the_recipe_in_the_code():
    """≤ 25 MB in the repository, and recipe.json records exactly the defaults of ``Recipe`` (the shipped
    weights are what ``scripts/train_demo_model.py`` trains)."""
    files = [p for p in DEMO_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    record = demo_recipe()
    assert record["recipe"] == json.loads(json.dumps(asdict(Recipe())))
    assert set(record["seconds"]) == {"synth", "vae", "cg", "pg"}
    assert record["total_bytes"] == sum(p.stat().st_size for p in files if p.name != "recipe.json")


def test_demo_cli_renders_the_contact_sheet(tmp_path, capsys):
    out = tmp_path / "sheet" / "demo.png"
    assert main(["demo", "--out", str(out), "--threads", "1"]) == 0
    assert "products pasted back unchanged: yes" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["demo.png"]  # no temp file left behind
    sheet = np.asarray(Image.open(out).convert("RGB"), np.float32) / 255
    cols, rows = len(DEMO_CATEGORIES) + 1, len(PRODUCT_SEEDS) + 1
    assert sheet.shape == (LABEL_H * 2 + rows * CELL, cols * CELL, 3)

    def cell(row, col):  # row 0..3 products, row 4 the reference-style row (below its own label strip)
        y = LABEL_H + row * CELL + (LABEL_H if row == len(PRODUCT_SEEDS) else 0)
        return sheet[y:y + CELL, col * CELL:(col + 1) * CELL]

    backgrounds = [cell(0, c) for c in range(1, cols)]
    pairwise = [np.abs(a - b).mean() for i, a in enumerate(backgrounds) for b in backgrounds[i + 1:]]
    assert min(pairwise) > 0.02  # every category looks different for the same product
    style_row = [cell(len(PRODUCT_SEEDS), c) for c in range(1, len(DEMO_REFERENCES) + 1)]
    assert min(np.abs(s - b).mean() for s in style_row for b in backgrounds) > 0.01


def test_demo_refuses_mixed_model_options(tmp_path, capsys):
    assert main(["demo", "--checkpoint", str(tmp_path / "sd.safetensors"), "--out", str(tmp_path / "x.png")]) == 2
    assert "--checkpoint needs --bank" in capsys.readouterr().err
    assert main(["demo", "--bank", str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "x.png")]) == 2
    assert "go with --checkpoint" in capsys.readouterr().err
    assert main(["demo", "--model", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no demo model here" in capsys.readouterr().err
    assert main(["demo", "--products", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_demo_model_knows_its_categories_and_refuses_others():
    pipe = load_demo_pipeline()
    assert len(pipe.components.identifiers.names) == 16
    from productbg.pipeline.errors import PipelineError
    from productbg.cli.demo import synthetic_product

    with pytest.raises(PipelineError, match="lamp"):
        pipe.generate(synthetic_product(1), category="lampz")


@pytest.mark.slow
def test_recipe_runs_end_to_end_at_tiny_scale_and_resumes(tmp_path):
    """The four stages (synth, autoencoder, CG from scratch, PG) and the pack, at a few steps each; a second run
    finds every stage finished and only re-packs."""
    recipe = Recipe(per_category=2, held_out=1, scale=0.002, batch_size=2)
    logs = []
    record = train(tmp_path / "work", tmp_path / "model", recipe, progress=False, log=logs.append)
    assert record["total_bytes"] <= MAX_BYTES
    pipe = load_demo_pipeline(tmp_path / "model")
    from productbg.cli.demo import synthetic_product, synthetic_reference

    result = pipe.generate(synthetic_product(0), category="mugs", seed=1, steps=2)[0]
    assert result.image.shape == (64, 64, 3) and np.isfinite(result.image).all()
    styled = pipe.generate(synthetic_product(0), reference=synthetic_reference("lamps"), seed=1, steps=2)[0]
    assert not np.array_equal(styled.raw, result.raw)
    checkpoints = sorted((tmp_path / "work").glob("*/checkpoints/*"))
    again = train(tmp_path / "work", tmp_path / "model", recipe, progress=False, log=logs.append)
    assert sorted((tmp_path / "work").glob("*/checkpoints/*")) == checkpoints  # nothing retrained
    assert again["recipe"] == record["recipe"]
    assert all(again["seconds"][k] >= record["seconds"][k] for k in record["seconds"])  # seconds add up


def test_train_script_cg_steps_changes_only_the_cg_stage(tmp_path, monkeypatch):
    """``scripts/train_demo_model.py --cg-steps N`` trains the shipped recipe with N CG steps (the variant the
    toy-table notes in docs/benchmarks.md compare against)."""
    import importlib.util

    import productbg.training.demo_model as demo_model

    seen = {}

    def record_recipe(work, out, recipe, progress=True, log=print):
        seen["recipe"] = recipe
        return {"seconds": {}, "total_bytes": 0}

    monkeypatch.setattr(demo_model, "train", record_recipe)
    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "scripts" / "train_demo_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "m"), "--threads", "1", "--no-progress"]
    assert script.main(argv + ["--cg-steps", "4200"]) == 0
    assert seen["recipe"] == replace(Recipe(), cg_steps=4200)
    assert script.main(argv) == 0
    assert seen["recipe"] == Recipe()
