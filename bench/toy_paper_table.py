"""The paper's claims at toy scale, on the embedded demo model and held-out BG-synth.

    python bench/toy_paper_table.py [--model assets/demo_model] [--per-category 8] [--steps 20]

The demo model (``assets/demo_model``, trained by ``scripts/train_demo_model.py``) is one UNet for all 16
BG-synth categories. Its held-out split (images never trained on, regenerated from the recipe's seed) gives
every test item: a product with its exact mask, and a category. Three measurements:

1. **Category-style accuracy** — each item's product is placed on a plain canvas and generated with its own
   category's identifier; a simple classifier (colour/layout/texture features + logistic regression,
   :mod:`tests/style_classifier.py`) trained on BG-synth *training* images judges which category the
   generated background belongs to. Target ≥ 95 %. The classifier's accuracy on real held-out images is
   printed as its own ceiling.
2. **Product leakage before paste-back** — the same generations with mask-guided attention on (strength 1)
   and off (strength 0): mean absolute difference, over the product's pixels, between the raw generated image
   (before the product is pasted back) and the product, 0..1 scale. Target: ≥ 3× lower with guidance.
   Beside it, the mechanism itself: the identifier's attention mass at product cells, averaged over every
   cross-attention layer and sampling step (:mod:`productbg.attention.probe`), on the first item of each
   category. "Off" is measured at strength 1e-6 (a bias of −1e-6: the same attention as no guidance, but the
   probe still sees the identifier's columns). That column mass is 0 by construction and blind to the leak
   through the causal text encoder, so beside it the **dependence** of product cells on the identifier, for
   ``context`` confinement (the default), ``columns`` (the first reading) and off:
   - *perturbation*: every layer's product-cell cross-attention output (queries held at those of the first
     run, so only the key/value path counts) when the identifier is swapped for another category's:
     ‖Δout‖ / ‖out‖ over all layers and steps of one generation;
   - *gradient*: the norm of d(Σ product-cell outputs)/d(identifier vectors) in one UNet forward.
   With ``context`` both are 0 up to float rounding; the other two show what a leak looks like.
3. **Reference-style similarity** — each item's product with a reference image from the category 8 places
   away (a different style family), Personality-Wise (reference style tokens, no identifier) vs category-only
   (the item's identifier): cosine similarity between classifier features of output and reference, and how
   often the output is classified as the *reference's* category.

The table is printed, then one JSON line (the last line) with every number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _load_split(root: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images ``[N,3,H,W]`` in 0..1, masks ``[N,H,W]`` and category names of a BG60k-layout split."""
    from productbg.training.datasets import load_pair, open_bg60k

    index = open_bg60k(root, split)
    pairs = [load_pair(r, size) for r in index.records]
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float() / 255
    return images, torch.from_numpy(np.stack([p[1] for p in pairs])), [r.category for r in index.records]


def _items(labels: list[str], per_category: int) -> list[int]:
    """The first ``per_category`` held-out items of every category."""
    seen: dict[str, int] = {}
    chosen = []
    for i, c in enumerate(labels):
        if seen.get(c, 0) < per_category:
            seen[c] = seen.get(c, 0) + 1
            chosen.append(i)
    return chosen


def _background(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``[B,3,H,W]`` images (0..1) with their products filled from the surrounding background: what the classifier
    judges, so it sees background style only, in training and evaluation alike."""
    from productbg.imaging.fill import fill_product

    return fill_product(images, (masks > 0.5).float()[:, None]).clamp(0, 1)


def _prepared(image: torch.Tensor, mask: torch.Tensor, grow: int):
    """The held-out item as a pipeline canvas: its product where it is, on grey (no original background reaches
    the model), the repaint mask = background grown by the recipe's inpaint grow."""
    from productbg import imaging
    from productbg.pipeline.pipeline import Prepared

    m = (mask > 0.5).float()
    placed = (image * m + 0.5 * (1 - m)).permute(1, 2, 0).numpy().astype(np.float32)
    return Prepared(placed, m.numpy(), np.asarray(imaging.inpaint_mask(m.numpy(), grow), np.float32), "held-out")


def _rgba(image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    return torch.cat([image, (mask > 0.5).float()[None]]).permute(1, 2, 0).numpy()


def _chw(arr: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(arr[..., :3])).permute(2, 0, 1)


def _leakage(raw: np.ndarray, placed: np.ndarray, mask: np.ndarray) -> float:
    """Mean |raw − product| over the product's pixels: how far the generator, before paste-back, moved them."""
    inside = mask >= 1
    return float(np.abs(raw - placed).mean(-1)[inside].mean()) if inside.any() else 0.0


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``p`` measured on ``n`` items."""
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    return float(centre - half), float(centre + half)


def _attention_on_product(pipe, prep, category: str, seed: int, strength: float) -> float:
    """The identifier's mean attention mass at product cells over every layer and step of one generation."""
    from productbg.attention import probe

    with probe.record() as rec:
        pipe.generate(prep, category=category, seed=seed, identifier_strength=strength)
    return float(np.mean([r.mean_mass_on_product for r in rec.identifier if r.product_cells]))


DEPENDENCE_MODES = {"context": ("context", 1.0), "columns": ("columns", 1.0), "off": ("columns", 1e-6)}


def _perturbation(pipe, prep, category: str, other: str, seed: int, mode: str) -> float:
    """‖Δ product-cell output‖ / ‖product-cell output‖ when ``category``'s identifier becomes ``other``'s."""
    from productbg.attention import probe

    confinement, strength = DEPENDENCE_MODES[mode]
    kw = dict(seed=seed, identifier_strength=strength, confinement=confinement)
    with probe.record(keep_outputs=True) as first:
        pipe.generate(prep, category=category, **kw)
    with probe.record(replay=[o.query for o in first.outputs]) as second:
        pipe.generate(prep, category=other, **kw)
    delta = sum(float((a.output - b.output)[a.product].norm() ** 2) for a, b in zip(first.outputs, second.outputs))
    norm = sum(float(a.output[a.product].norm() ** 2) for a in first.outputs)
    return (delta / max(norm, 1e-20)) ** 0.5


def _gradient(pipe, prep, category: str, mode: str) -> float:
    """‖d(Σ product-cell cross-attention outputs) / d(identifier vectors)‖ in one UNet forward."""
    from productbg.attention import Guidance, IdentifierGuidance, ProductMask, probe
    from productbg.attention.diffusers_processor import CALL_KEY, DiffusersCall

    confinement, strength = DEPENDENCE_MODES[mode]
    c, prompts = pipe.components, pipe.prompts
    encoded = prompts.encode(category, pipe.settings.template, pipe.settings.extra_text)
    slots = prompts._slots[0]  # first (SD1.5: only) text encoder
    vectors = c.text_encoder.get_input_embeddings().weight[slots].detach().clone().requires_grad_(True)
    ids = prompts._ids(encoded.text)[0]
    where = torch.isin(ids[0], slots)

    def splice(module, inputs, output):
        output = output.clone()
        output[0, where] = vectors.to(output.dtype)
        return output

    hook = c.text_encoder.get_input_embeddings().register_forward_hook(splice)
    try:
        context = c.text_encoder(ids).last_hidden_state.float()
    finally:
        hook.remove()
    g = IdentifierGuidance(encoded.spec, ProductMask(torch.as_tensor(prep.mask)), strength, confinement=confinement)
    h, w = prep.mask.shape[0] // 8, prep.mask.shape[1] // 8
    latents = torch.randn(1, c.unet.config.in_channels, h, w, generator=torch.Generator().manual_seed(0))
    call = DiffusersCall(Guidance().with_identifier(g), latent_hw=(h, w), cond_or_uncond=(0,))
    with probe.record(keep_outputs=True) as rec:
        c.unet(latents, 500, context, cross_attention_kwargs={CALL_KEY: call})
    total = sum(o.output[o.product].sum() for o in rec.outputs)
    (grad,) = torch.autograd.grad(total, vectors)
    return float(grad.norm())


def dependence_only(model: Path, categories: int, steps: int) -> dict:
    """Only the dependence measures, on the first held-out item of the first ``categories`` categories."""
    from productbg import imaging
    from productbg.pipeline.embedded import demo_recipe, load_demo_pipeline
    from productbg.training.bgsynth import SynthSpec, generate

    recipe = demo_recipe(model)
    with tempfile.TemporaryDirectory() as tmp:
        spec = SynthSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in recipe["synth"].items()})
        generate(Path(tmp), spec)
        test_x, test_m, test_y = _load_split(Path(tmp), "bg1k", spec.size)
    pipe = load_demo_pipeline(model)
    pipe.settings = replace(pipe.settings, steps=steps)
    grow = imaging.inpaint_grow_pixels(spec.size, spec.size, pipe.settings.inpaint_grow)
    names = sorted(set(test_y))
    result: dict = {"categories": categories, "steps": steps, "model": model.name}
    for mode in DEPENDENCE_MODES:
        perturbation, gradient = [], []
        for n, cat in enumerate(names[:categories]):
            i = test_y.index(cat)
            prep = _prepared(test_x[i], test_m[i], grow)
            other = names[(names.index(cat) + 1) % len(names)]
            perturbation.append(_perturbation(pipe, prep, cat, other, n, mode))
            gradient.append(_gradient(pipe, prep, cat, mode))
        result[f"dependence_perturbation_{mode}"] = float(np.mean(perturbation))
        result[f"dependence_gradient_{mode}"] = float(np.mean(gradient))
    return result


def run(model: Path, per_category: int, steps: int, cfg: float | None = None, log=print) -> dict:
    from productbg import imaging
    from productbg.pipeline.embedded import STYLE_ONLY_TEMPLATE, demo_recipe, load_demo_pipeline
    from productbg.training.bgsynth import SynthSpec, generate
    sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))  # test-only classifier
    from style_classifier import train_classifier

    recipe = demo_recipe(model)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        spec = SynthSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in recipe["synth"].items()})
        generate(Path(tmp), spec)
        train_x, train_m, train_y = _load_split(Path(tmp), "bg60k", spec.size)
        test_x, test_m, test_y = _load_split(Path(tmp), "bg1k", spec.size)
    classifier = train_classifier(_background(train_x, train_m), train_y)
    ceiling = classifier.accuracy(_background(test_x, test_m), test_y)
    pipe = load_demo_pipeline(model)
    pipe.settings = replace(pipe.settings, steps=steps, guidance_scale=cfg or pipe.settings.guidance_scale)
    grow = imaging.inpaint_grow_pixels(spec.size, spec.size, pipe.settings.inpaint_grow)
    classes = classifier.classes
    items = _items(test_y, per_category)
    out: dict[str, list] = {k: [] for k in ("guided", "plain", "pg", "leak_on", "leak_off", "refs", "ref_labels",
                                            "masks", "attention_on", "attention_off",
                                            *(f"perturbation_{m}" for m in DEPENDENCE_MODES),
                                            *(f"gradient_{m}" for m in DEPENDENCE_MODES))}
    probed: set[str] = set()
    for n, i in enumerate(items):
        prep, cat = _prepared(test_x[i], test_m[i], grow), test_y[i]
        out["masks"].append(torch.as_tensor(prep.mask))
        on = pipe.generate(prep, category=cat, seed=n)[0]
        off = pipe.generate(prep, category=cat, seed=n, identifier_strength=0.0)[0]
        out["guided"].append(_chw(on.image))
        out["plain"].append(_chw(off.image))
        out["leak_on"].append(_leakage(on.raw, prep.placed, prep.mask))
        out["leak_off"].append(_leakage(off.raw, prep.placed, prep.mask))
        if cat not in probed:
            probed.add(cat)
            out["attention_on"].append(_attention_on_product(pipe, prep, cat, n, 1.0))
            out["attention_off"].append(_attention_on_product(pipe, prep, cat, n, 1e-6))
            other = classes[(classes.index(cat) + 1) % len(classes)]
            for mode in DEPENDENCE_MODES:
                out[f"perturbation_{mode}"].append(_perturbation(pipe, prep, cat, other, n, mode))
                out[f"gradient_{mode}"].append(_gradient(pipe, prep, cat, mode))
        r = next(j for j in items if test_y[j] == classes[(classes.index(cat) + 8) % len(classes)])
        out["pg"].append(_chw(pipe.generate(prep, reference=_rgba(test_x[r], test_m[r]), seed=n,
                                            template=STYLE_ONLY_TEMPLATE)[0].image))
        out["refs"].append(_background(test_x[r:r + 1], test_m[r:r + 1])[0])
        out["ref_labels"].append(test_y[r])
        if (n + 1) % 16 == 0:
            log(f"  {n + 1}/{len(items)} items ({time.perf_counter() - start:.0f} s)")
    labels = [test_y[i] for i in items]
    masks = torch.stack(out["masks"])
    guided, plain, pg = (_background(torch.stack(out[k]), masks) for k in ("guided", "plain", "pg"))
    ref_emb = F.normalize(classifier.embed(torch.stack(out["refs"])), dim=1)
    sim = lambda x: float((F.normalize(classifier.embed(x), dim=1) * ref_emb).sum(1).mean())  # noqa: E731
    predicted = classifier.predict(guided)
    per_category = {c: float(np.mean([p == c for p, t in zip(predicted, labels) if t == c])) for c in classes}
    mean_on, mean_off = float(np.mean(out["leak_on"])), float(np.mean(out["leak_off"]))
    return {
        "items": len(items), "categories": len(classes), "steps": steps,
        "guidance_scale": pipe.settings.guidance_scale, "model": model.name,
        "category_accuracy": (accuracy := classifier.accuracy(guided, labels)),
        "category_accuracy_95ci": _wilson(accuracy, len(labels)),
        "category_accuracy_without_guidance": classifier.accuracy(plain, labels),
        "classifier_accuracy_real_held_out": ceiling,
        "leakage_with_guidance": mean_on, "leakage_without_guidance": mean_off,
        "leakage_ratio": mean_off / max(mean_on, 1e-8),
        "identifier_attention_on_product_with_guidance": float(np.mean(out["attention_on"])),
        "identifier_attention_on_product_without_guidance": float(np.mean(out["attention_off"])),
        **{f"dependence_{kind}_{m}": float(np.mean(out[f"{kind}_{m}"]))
           for kind in ("perturbation", "gradient") for m in DEPENDENCE_MODES},
        "style_similarity_pg": sim(pg), "style_similarity_category_only": sim(guided),
        "reference_category_rate_pg": classifier.accuracy(pg, out["ref_labels"]),
        "reference_category_rate_category_only": classifier.accuracy(guided, out["ref_labels"]),
        "per_category_accuracy": per_category,
        "seconds": round(time.perf_counter() - start, 1),
    }


def table(r: dict) -> str:
    rows = [
        ("Category-style accuracy (one model, identifier prompts)", f"{r['category_accuracy']:.1%}", "≥ 95%"),
        ("  95% confidence interval ({} items)".format(r["items"]),
         "{:.0%}–{:.0%}".format(*r["category_accuracy_95ci"]), ""),
        ("  same, mask-guided attention off", f"{r['category_accuracy_without_guidance']:.1%}", ""),
        ("  classifier on real held-out images (ceiling)", f"{r['classifier_accuracy_real_held_out']:.1%}", ""),
        ("Product leakage before paste-back, guidance on", f"{r['leakage_with_guidance']:.4f}", ""),
        ("Product leakage before paste-back, guidance off", f"{r['leakage_without_guidance']:.4f}", ""),
        ("  leakage ratio off / on", f"{r['leakage_ratio']:.1f}×", "≥ 3×"),
        ("Identifier attention on product cells, guidance on",
         f"{r['identifier_attention_on_product_with_guidance']:.4f}", ""),
        ("Identifier attention on product cells, guidance off",
         f"{r['identifier_attention_on_product_without_guidance']:.4f}", ""),
        *((f"Product-cell dependence on the identifier, {kind}, {m}", f"{r[f'dependence_{kind}_{m}']:.2e}",
           "0" if m == "context" else "")
          for kind in ("perturbation", "gradient") for m in DEPENDENCE_MODES),
        ("Reference-style similarity, Personality-Wise", f"{r['style_similarity_pg']:.3f}", ""),
        ("Reference-style similarity, category-only", f"{r['style_similarity_category_only']:.3f}", ""),
        ("Output judged as the reference's category, PG", f"{r['reference_category_rate_pg']:.1%}", ""),
        ("Output judged as the reference's category, category-only",
         f"{r['reference_category_rate_category_only']:.1%}", ""),
    ]
    width = max(len(a) for a, _, _ in rows)
    lines = [f"{'measure':<{width}}  {'value':>8}  target", "-" * (width + 20)]
    lines += [f"{a:<{width}}  {b:>8}  {c}" for a, b, c in rows]
    lines.append(f"({r['items']} held-out items, {r['categories']} categories, {r['steps']} DDIM steps, "
                 f"{r['seconds']:.0f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from productbg.pipeline.embedded import DEMO_MODEL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO_MODEL, help="demo-model folder (default: the embedded one)")
    p.add_argument("--per-category", type=int, default=8, help="held-out items per category (default 8: all)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20, the demo's)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the demo model's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dependence-only", type=int, metavar="N",
                   help="only the product-cell dependence measures, on N categories (a few minutes)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.dependence_only:
        result = dependence_only(args.model, args.dependence_only, args.steps)
        for key, value in result.items():
            print(f"{key:<36} {value}")
        print(json.dumps(result))
        return 0
    result = run(args.model, args.per_category, args.steps, args.cfg, log=lambda m: print(m, file=sys.stderr))
    ok = (result["category_accuracy"] >= 0.95 and result["leakage_ratio"] >= 3
          and result["style_similarity_pg"] > result["style_similarity_category_only"]
          and result["dependence_perturbation_context"] == 0 and result["dependence_gradient_context"] == 0)
    print(table(result))
    print(json.dumps({**result, "pass": ok}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
