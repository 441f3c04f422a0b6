"""``train-cg --init-bank``: training starts from a bank's vectors (a from-text bank's per-category counts kept),
for one and two text encoders; banks for another model, missing categories and column-based modes with varied
counts are refused in one line."""
import pytest
import torch

from productbg.cli import main
from productbg.pipeline.tiny import CROSS_DIM, TINY_XL_WIDTHS
from productbg.training import bgsynth
from productbg.training.cg import CGConfig, CGTask
from productbg.training.state import step_generator
from productbg.weights.bank import CategoryBank, load_bank

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = ("运动鞋", "lamp")
COUNTS = {"运动鞋": 3, "lamp": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_bank_data")
    bgsynth.generate(root, bgsynth.SynthSpec(categories=2, per_category=2, held_out=0, size=32, seed=4, names=NAMES))
    return root


def _bank(path, family, widths, extra=()):
    gen = torch.Generator().manual_seed(0)
    bank = CategoryBank(family, vectors_per_id=3, varied_counts=True)
    for name in (*NAMES, *extra):
        n = COUNTS.get(name, 2)
        bank.add(name.upper() if name == "lamp" else name,  # letter case as Category Prompt resolves it
                 {enc: torch.randn(n, w, generator=gen) for enc, w in widths.items()})
    bank.save(path)
    return path


@pytest.mark.parametrize("model,family,widths", [
    ("tiny-inpaint", "tiny", {"clip_l": CROSS_DIM}),
    ("tiny-sdxl-inpaint", "tiny-sdxl", dict(zip(("clip_l", "clip_g"), TINY_XL_WIDTHS))),
])
def test_training_starts_from_the_banks_vectors_and_keeps_their_counts(data, tmp_path, model, family, widths):
    start = _bank(tmp_path / "start.safetensors", family, widths, extra=("unused",))
    task = CGTask(CGConfig(data=data, model=model, resolution=32, lora_rank=2, init_bank=start))
    module = task.build(torch.device("cpu"))
    with load_bank(start) as bank:
        for c, name in enumerate(task.categories):
            for e, enc in zip(module.text.embeddings, bank.encoders):
                own = bank.vectors(bank.resolve(name), enc)
                assert torch.equal(e.identifier_vectors()[c, :own.shape[0]], own.float())
    # each category's prompt holds only its own vectors: 3 identifier tokens for one, 1 for the other
    rows = module.prompt_ids[0, :2]
    placeholders = (rows >= module.embedding.first) & (rows < module.embedding.first + module.embedding.count)
    assert sorted(placeholders.sum(1).tolist()) == [1, 3]
    batch = torch.utils.data.default_collate([task.dataset()[(i, i)] for i in range(2)])
    assert torch.isfinite(module(batch, step_generator(0, 0, 0, 0))["loss"])

    out = tmp_path / "run"
    assert main(["train-cg", "--data", str(data), "--model", model, "--output", str(out), "--resolution", "32",
                 "--max-steps", "2", "--lora-rank", "2", "--init-bank", str(start), "--checkpoint-every", "0",
                 "--no-progress"]) == 0
    with load_bank(out / "category_bank.safetensors") as trained, load_bank(start) as bank:
        assert trained.family == family and trained.names == list(task.categories)
        assert {n: trained.vector_count(n) for n in trained.names} == COUNTS
        assert trained.training["init_bank"] == "start.safetensors"
        moved = [not torch.equal(trained.vectors(n, enc).float(), bank.vectors(bank.resolve(n), enc).float())
                 for n in trained.names for enc in trained.encoders]
        assert any(moved)  # trained, not copied


def test_bad_start_banks_are_refused_in_one_line(data, tmp_path, capsys):
    widths = {"clip_l": CROSS_DIM}
    common = ["train-cg", "--data", str(data), "--resolution", "32", "--max-steps", "1", "--no-progress"]
    lacking = CategoryBank("tiny", vectors_per_id=1)
    lacking.add("lamp", torch.zeros(1, CROSS_DIM))
    lacking.save(tmp_path / "lacking.safetensors")
    assert main([*common, "--model", "tiny-inpaint", "--output", str(tmp_path / "a"),
                 "--init-bank", str(tmp_path / "lacking.safetensors")]) != 0
    assert "lacks 1 of the dataset's categories" in capsys.readouterr().err
    varied = _bank(tmp_path / "varied.safetensors", "tiny", widths)
    assert main([*common, "--model", "tiny-inpaint", "--output", str(tmp_path / "b"), "--init-bank", str(varied),
                 "--confinement", "columns"]) != 0
    assert "different vector counts" in capsys.readouterr().err
    assert main([*common, "--model", "tiny-sdxl-inpaint", "--output", str(tmp_path / "c"),
                 "--init-bank", str(varied)]) != 0
    assert "cannot start training on a sdxl model" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # a refused run leaves no folder behind
