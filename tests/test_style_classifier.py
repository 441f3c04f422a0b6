"""The toy evaluation's style judge (features + logistic regression) and the toy paper table on the demo model."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from productbg.training import bgsynth
from style_classifier import features, train_classifier

ROOT = Path(__file__).resolve().parent.parent


def _images(categories, count, seed, size=48):
    spec = bgsynth.SynthSpec(categories=len(categories), size=size, seed=seed)
    images, labels = [], []
    for c in range(len(categories)):
        for n in range(count):
            image, _ = bgsynth.render(spec, "bg60k", 1000 * c + n, c)
            images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
            labels.append(categories[c])
    return torch.stack(images), labels


def test_features_are_finite_fixed_length_and_see_colour_and_texture():
    flat = torch.full((1, 3, 32, 32), 0.5)
    red = flat.clone()
    red[:, 0] = 0.9
    stripes = flat.clone()
    stripes[..., ::4, :] = 0.1
    f = features(torch.cat([flat, red, stripes]))
    assert f.shape[0] == 3 and torch.isfinite(f).all()
    assert not torch.allclose(f[0], f[1]) and not torch.allclose(f[0], f[2])
    assert torch.equal(features(flat.expand(2, -1, -1, -1))[0], features(flat)[0])  # per image, batch-independent
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        features(torch.zeros(3, 32, 32))


def test_classifier_separates_bgsynth_families_on_unseen_images():
    names = ["a", "b", "c", "d"]
    train_x, train_y = _images(names, 12, seed=0)
    all_x, _ = _images(names, 18, seed=0)  # images 12..17 of every category were not trained on
    test_x, test_y = all_x.view(4, 18, 3, 48, 48)[:, 12:].reshape(-1, 3, 48, 48), [n for n in names for _ in range(6)]
    clf = train_classifier(train_x, train_y)
    assert clf.classes == names
    assert clf.accuracy(test_x, test_y) >= 0.9
    shuffled = list(np.random.default_rng(0).permutation(test_y))
    assert clf.accuracy(test_x, shuffled) < clf.accuracy(test_x, test_y)
    with pytest.raises(ValueError, match="two categories"):
        train_classifier(train_x[:3], ["a"] * 3)


def _bench():
    spec = importlib.util.spec_from_file_location("toy_paper_table", ROOT / "bench" / "toy_paper_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_toy_paper_table_runs_on_the_demo_model(capsys):
    """One held-out item per category, few steps: the table prints and its last line is the JSON record."""
    bench = _bench()
    assert bench.main(["--per-category", "1", "--steps", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    import json

    record = json.loads(out[-1])
    assert record["items"] == 16 and record["categories"] == 16
    assert record["classifier_accuracy_real_held_out"] >= 0.95
    for key in ("category_accuracy", "reference_category_rate_pg", "reference_category_rate_category_only"):
        assert 0.0 <= record[key] <= 1.0
    assert record["leakage_with_guidance"] >= 0 and record["leakage_without_guidance"] >= 0
    # the mechanism: with guidance the identifier never attends to product cells; without it, it does
    assert record["identifier_attention_on_product_with_guidance"] == 0.0
    assert record["identifier_attention_on_product_without_guidance"] > 0.01
    # the dependence measures: exactly 0 with context confinement, and they move when the mechanism leaks
    assert record["dependence_perturbation_context"] == 0.0 and record["dependence_gradient_context"] == 0.0
    for mode in ("columns", "off"):
        assert record[f"dependence_perturbation_{mode}"] > 1e-3 and record[f"dependence_gradient_{mode}"] > 0
    low, high = record["category_accuracy_95ci"]
    assert low <= record["category_accuracy"] <= high
    assert any("Category-style accuracy" in line for line in out)
