"""Write the shipped workflows: API format in workflows/api/, UI format + thumbnail in workflows/ (optional).

    python scripts/make_workflows.py                 # API-format graphs only (pure Python)
    python scripts/make_workflows.py --ui URL        # also UI format + PNG thumbnail through the real web
                                                      # frontend of a ComfyUI server running this pack
The UI step runs scripts/ui_roundtrip.js (headless Chromium + playwright-core; see that file), so the UI files
are exactly what the frontend itself saves. The category workflows have one Category node feeding every Category
Prompt / Category LoRA (one place to switch; added last so the other nodes keep their ids). Defaults follow the paper's recipe: 512², 40 DDIM steps, CFG 7.5,
fill 0.74, inpaint mask grown 20 px, product pasted back. The ``*_sdxl`` twins run at SDXL's 1024² with
``backbones.SDXL.sampler`` (30 steps dpmpp_2m karras, CFG 6) and the SDXL model files.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "workflows"
CHECKPOINT = "sd-v1-5-inpainting.safetensors"
BANK = "category_bank.safetensors"
STYLE_ENCODER = "ip-adapter_sd15.safetensors"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0_inpainting_0.1.safetensors"
SDXL_BANK = "category_bank_sdxl.safetensors"
SDXL_STYLE_ENCODER = "ip-adapter_sdxl_vit-h.safetensors"


class Setup:
    """What differs between a backbone's workflows: model files, canvas and sampler (backbones.py's defaults)."""

    def __init__(self, label, checkpoint, bank, style_encoder, size, steps, cfg, sampler_name, scheduler):
        self.label, self.checkpoint, self.bank, self.style_encoder = label, checkpoint, bank, style_encoder
        self.size, self.sampler = size, dict(steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler)


SD15_SETUP = Setup("SD1.5", CHECKPOINT, BANK, STYLE_ENCODER, 512, 40, 7.5, "ddim", "ddim_uniform")


def sdxl_setup() -> Setup:
    from productbg.backbones import SDXL

    d = SDXL.sampler
    return Setup("SDXL", SDXL_CHECKPOINT, SDXL_BANK, SDXL_STYLE_ENCODER, SDXL.default_size, d.steps, d.cfg,
                 d.sampler_name, d.scheduler)
FLUX_FILL = "flux1-fill-dev.safetensors"
FLUX_T5 = "t5xxl_fp8_e4m3fn.safetensors"
FLUX_CLIP_L = "clip_l.safetensors"
FLUX_VAE = "ae.safetensors"
FLUX_BANK = "category_bank_flux.safetensors"
FLUX_REDUX = "flux1-redux-dev.safetensors"
FLUX_SIGLIP = "sigclip_vision_patch14_384.safetensors"
PRODUCT = "productbg_example_product.png"
REFERENCE = "productbg_example_reference.png"


class Graph:
    """A tiny builder for API-format prompts: ``add`` returns the node id; ``out(id, i)`` links an output."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, title: str | None = None, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        if title:
            self.nodes[node_id]["_meta"] = {"title": title}
        return node_id


def out(node_id: str, index: int = 0) -> list:
    return [node_id, index]


def _product_front(g: Graph, image: list, transparency: list | None = None, size: int = 512) -> tuple[str, str]:
    seg_inputs = dict(image=image, method="auto", tolerance=10.0, shadow_strength=0.75, threshold=0.5, grow=0,
                      fill_holes=True, keep_largest=False, feather=1.0, clean_edges=True)
    if transparency is not None:
        seg_inputs["transparency"] = transparency
    seg = g.add("ProductBGSegmentProduct", **seg_inputs)
    place = g.add("ProductBGPlaceProduct", image=out(seg, 0), mask=out(seg, 1), canvas="1:1", width=size, height=size,
                  fill_ratio=0.74, anchor="center", margin=0.05, fill_color="#FFFFFF", inpaint_grow=20)
    return seg, place


def _back_end(g: Graph, ckpt: str | None, model: list, positive: list, place: str, prefix: str,
              negative_text: str = "product, object, text, watermark, blurry, low quality",
              setup: Setup = SD15_SETUP, clip: list | None = None, vae: list | None = None) -> None:
    """Inpaint, sample, decode, paste back, save, report, export; ``clip`` / ``vae`` default to the checkpoint's."""
    clip, vae = clip or out(ckpt, 1), vae or out(ckpt, 2)
    neg = g.add("CLIPTextEncode", "Negative prompt", clip=clip, text=negative_text)
    inpaint = g.add("InpaintModelConditioning", positive=positive, negative=out(neg), vae=vae,
                    pixels=out(place, 0), mask=out(place, 2), noise_mask=True)
    sample = g.add("KSampler", model=model, positive=out(inpaint, 0), negative=out(inpaint, 1),
                   latent_image=out(inpaint, 2), seed=42, **setup.sampler, denoise=1.0)
    decode = g.add("VAEDecode", samples=out(sample), vae=vae)
    comp = g.add("ProductBGCompositeProduct", generated=out(decode), placed=out(place, 0),
                 product_mask=out(place, 1), feather=2.0)
    # The report finds the output's product itself (GrabCut seeded by the product mask) and never fails the run:
    # segmenting the generated scene from scratch fails on a plain white packshot's composite, so it is not done.
    g.add("SaveImage", images=out(comp), filename_prefix=prefix)
    g.add("ProductBGPreservationReport", product_image=out(place, 0), product_mask=out(place, 1),
          output_image=out(comp), max_delta_e_mean=2.0, min_psnr_db=20.0, max_expansion_ratio=0.05,
          generated_image=out(decode))
    # The marketplace deliverable: the background resized to 2000², the original product at its own resolution.
    g.add("ProductBGExportProduct", "Export for Marketplace", generated=out(decode), placement=out(place, 3),
          size="amazon-zoom", width=2000, height=2000, format="jpeg", quality=95, feather=2.0,
          filename_prefix=f"{prefix}_export", save=True)


def category_background(with_style: bool = False, with_lora: bool = False, prefix: str = "productbg",
                        setup: Setup = SD15_SETUP) -> dict:
    g = Graph()
    load = g.add("LoadImage", "Product photo", image=PRODUCT)
    seg, place = _product_front(g, out(load, 0), out(load, 1), setup.size)
    ckpt = g.add("CheckpointLoaderSimple", f"{setup.label} inpainting checkpoint", ckpt_name=setup.checkpoint)
    bank = g.add("ProductBGLoadCategoryBank", bank_name=setup.bank)
    model, clip = out(ckpt, 0), out(ckpt, 1)
    if with_lora:
        lora = g.add("ProductBGCategoryLora", model=model, clip=clip, bank=out(bank), category="shoes",
                     lora_name="(from bank)", strength_model=1.0, strength_clip=1.0)
        model, clip = out(lora, 0), out(lora, 1)
    prompt = g.add("ProductBGCategoryPrompt", clip=clip, bank=out(bank), category="shoes", template="",
                   extra_text="soft studio light, high quality")
    attn = g.add("ProductBGMaskGuidedAttention", model=model, identifier=out(prompt, 1),
                 product_mask=out(place, 1), strength=1.0, start_percent=0.0, end_percent=1.0)
    model = out(attn)
    if with_style:
        model = _style(g, model, place, setup)
    _back_end(g, ckpt, model, out(prompt, 0), place, prefix, setup=setup)
    _one_category(g, bank, "shoes")
    return g.nodes


def _one_category(g: Graph, bank: str, name: str) -> str:
    """One place to switch: a Category node (added last, so every other node keeps its id) whose output is the
    category of every Category Prompt and Category LoRA of the graph."""
    cat = g.add("ProductBGCategory", "Category (switch it here)", bank=out(bank), category=name)
    for node in g.nodes.values():
        if node["class_type"] in ("ProductBGCategoryPrompt", "ProductBGCategoryLora"):
            node["inputs"]["category"] = out(cat)
    return cat


def _style(g: Graph, model: list, place: str, setup: Setup = SD15_SETUP) -> list:
    vision = g.add("CLIPVisionLoader", clip_name=CLIP_VISION)
    encoder = g.add("ProductBGLoadStyleEncoder", encoder_name=setup.style_encoder)
    ref = g.add("LoadImage", "Brand reference image", image=REFERENCE)
    ref_seg = g.add("ProductBGSegmentProduct", "Reference product (removed before encoding)", image=out(ref, 0),
                    method="auto", tolerance=10.0, shadow_strength=0.75, threshold=0.5, grow=4, fill_holes=True,
                    keep_largest=False, feather=1.0, clean_edges=False)
    style = g.add("ProductBGReferenceStyle", model=model, style_encoder=out(encoder), clip_vision=out(vision),
                  reference=out(ref, 0), weight=0.8, layer_preset="all", start_percent=0.0, end_percent=1.0,
                  reference_mask=out(ref_seg, 1), product_mask=out(place, 1))
    return out(style)


def flux_background(with_style: bool = False, prefix: str = "productbg_category_flux") -> dict:
    """The category workflow on Flux.1 Fill: UNETLoader + DualCLIPLoader (T5-XXL + CLIP-L) + VAELoader, the
    backbone's canvas and sampler (CFG 1, so the negative prompt is unused), distilled guidance for Fill."""
    from productbg.backbones import FLUX

    d = FLUX.sampler
    setup = Setup("Flux.1", None, FLUX_BANK, None, FLUX.default_size, d.steps, d.cfg, d.sampler_name, d.scheduler)
    g = Graph()
    load = g.add("LoadImage", "Product photo", image=PRODUCT)
    seg, place = _product_front(g, out(load, 0), out(load, 1), setup.size)
    unet = g.add("UNETLoader", "Flux.1 Fill", unet_name=FLUX_FILL, weight_dtype="default")
    clip = g.add("DualCLIPLoader", "T5-XXL + CLIP-L", clip_name1=FLUX_CLIP_L, clip_name2=FLUX_T5, type="flux")
    vae = g.add("VAELoader", "Flux VAE", vae_name=FLUX_VAE)
    bank = g.add("ProductBGLoadCategoryBank", bank_name=FLUX_BANK)
    prompt = g.add("ProductBGCategoryPrompt", clip=out(clip), bank=out(bank), category="shoes", template="",
                   extra_text="soft studio light, high quality")
    positive = g.add("FluxGuidance", conditioning=out(prompt, 0), guidance=d.inpaint_guidance)
    attn = g.add("ProductBGMaskGuidedAttention", model=out(unet), identifier=out(prompt, 1),
                 product_mask=out(place, 1), strength=1.0, start_percent=0.0, end_percent=1.0)
    model, positive = out(attn), out(positive)
    if with_style:
        vision = g.add("CLIPVisionLoader", "SigLIP (Redux)", clip_name=FLUX_SIGLIP)
        redux = g.add("StyleModelLoader", "Flux Redux", style_model_name=FLUX_REDUX)
        ref = g.add("LoadImage", "Brand reference image", image=REFERENCE)
        ref_seg = g.add("ProductBGSegmentProduct", "Reference product (removed before encoding)", image=out(ref, 0),
                        method="auto", tolerance=10.0, shadow_strength=0.75, threshold=0.5, grow=4, fill_holes=True,
                        keep_largest=False, feather=1.0, clean_edges=False)
        style = g.add("ProductBGReferenceStyleRedux", model=model, conditioning=positive, style_model=out(redux),
                      clip_vision=out(vision), reference=out(ref, 0), strength=1.0, start_percent=0.0,
                      end_percent=1.0, reference_mask=out(ref_seg, 1), product_mask=out(place, 1))
        model, positive = out(style, 0), out(style, 1)
    _back_end(g, None, model, positive, place, prefix, negative_text="", setup=setup, clip=out(clip), vae=out(vae))
    _one_category(g, bank, "shoes")
    return g.nodes


def zero_shot_confinement(setup: Setup = SD15_SETUP, prefix: str = "productbg_zero_shot") -> dict:
    g = Graph()
    load = g.add("LoadImage", "Product photo", image=PRODUCT)
    seg, place = _product_front(g, out(load, 0), out(load, 1), setup.size)
    ckpt = g.add("CheckpointLoaderSimple", f"{setup.label} inpainting checkpoint", ckpt_name=setup.checkpoint)
    words = g.add("ProductBGBackgroundWords", clip=out(ckpt, 1),
                  text="a product photo on a white marble table with green leaves, soft light, high quality",
                  background_words="white marble table with green leaves")
    attn = g.add("ProductBGMaskGuidedAttention", model=out(ckpt, 0), identifier=out(words, 1),
                 product_mask=out(place, 1), strength=1.0, start_percent=0.0, end_percent=1.0)
    model = _style(g, out(attn), place, setup)
    _back_end(g, ckpt, model, out(words, 0), place, prefix, setup=setup)
    return g.nodes


def batch_folder() -> dict:
    g = Graph()
    folder = g.add("ProductBGLoadProductsFromFolder", folder="products", index=0, csv_file="",
                   path_column="path", category_column="category")
    seg, place = _product_front(g, out(folder, 0))
    g.nodes[seg]["inputs"]["external_mask"] = out(folder, 1)
    ckpt = g.add("CheckpointLoaderSimple", "SD1.5 inpainting checkpoint", ckpt_name=CHECKPOINT)
    bank = g.add("ProductBGLoadCategoryBank", bank_name=BANK)
    prompt = g.add("ProductBGCategoryPrompt", clip=out(ckpt, 1), bank=out(bank), category=out(folder, 2),
                   template="", extra_text="soft studio light, high quality")
    attn = g.add("ProductBGMaskGuidedAttention", model=out(ckpt, 0), identifier=out(prompt, 1),
                 product_mask=out(place, 1), strength=1.0, start_percent=0.0, end_percent=1.0)
    _back_end(g, ckpt, out(attn), out(prompt, 0), place, "productbg_batch")
    return g.nodes


WORKFLOWS = {
    "category_background": lambda: category_background(prefix="productbg_category"),
    "reference_style": lambda: category_background(with_style=True, prefix="productbg_reference_style"),
    "category_style_lora": lambda: category_background(with_style=True, with_lora=True, prefix="productbg_lora"),
    "zero_shot_confinement": zero_shot_confinement,
    "batch_folder": batch_folder,
    "category_background_sdxl": lambda: category_background(prefix="productbg_category_sdxl", setup=sdxl_setup()),
    "reference_style_sdxl": lambda: category_background(with_style=True, prefix="productbg_reference_style_sdxl",
                                                        setup=sdxl_setup()),
    "zero_shot_confinement_sdxl": lambda: zero_shot_confinement(sdxl_setup(), "productbg_zero_shot_sdxl"),
    "category_background_flux": flux_background,
    "reference_style_flux": lambda: flux_background(with_style=True, prefix="productbg_reference_style_flux"),
}


def example_inputs(folder: Path) -> None:
    """The example product photo (white packshot with a shadow) and a brand reference image, as PNGs."""
    import numpy as np
    from PIL import Image

    from productbg.imaging.synthetic import packshot
    from productbg.training import bgsynth

    shot = packshot(size=512, product_rgb=(0.85, 0.2, 0.15), box=(34.0, 100.0, 44.0, 84.0))
    rng = np.random.default_rng(7)
    ref = bgsynth.background("wood", bgsynth.category_palette(5, 7), rng, 512)
    colour, mask = bgsynth.product(rng, 512)
    ref = np.where(mask[..., None], colour, ref)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in ((PRODUCT, shot.image), (REFERENCE, ref)):
        Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(folder / name)


def thumbnail(png: Path) -> None:
    """Shrink the frontend's PNG screenshot into a same-name JPEG thumbnail."""
    from PIL import Image

    with Image.open(png) as im:
        im = im.convert("RGB")
        im.thumbnail((1400, 1400))
        im.save(png.with_suffix(".jpg"), quality=85)
    png.unlink()


def keep_ids(previous: dict, workflow: dict) -> dict:
    """``workflow`` (UI format) with every node given the id it had in ``previous``, the UI file it replaces:
    nodes are matched by type, in id order; nodes the previous file lacked get ids after its last one. Links
    follow their nodes, so workflows saved from the previous file keep their node ids."""
    old_by_type: dict[str, list[int]] = {}
    for node in sorted(previous.get("nodes", []), key=lambda n: n["id"]):
        old_by_type.setdefault(node["type"], []).append(node["id"])
    next_id = max([previous.get("last_node_id", 0)] + [n["id"] for n in previous.get("nodes", [])]) + 1
    mapping: dict[int, int] = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        free = old_by_type.get(node["type"], [])
        if free:
            mapping[node["id"]] = free.pop(0)
        else:
            mapping[node["id"]], next_id = next_id, next_id + 1
    for node in workflow["nodes"]:
        node["id"] = mapping[node["id"]]
    for link in workflow["links"]:
        link[1], link[3] = mapping[link[1]], mapping[link[3]]
    workflow["nodes"].sort(key=lambda n: n["id"])
    workflow["last_node_id"] = max(mapping.values(), default=0)
    return workflow


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ui", metavar="URL", help="ComfyUI server (with this pack) for the UI-format round trip")
    ap.add_argument("--only", nargs="+", choices=list(WORKFLOWS), metavar="NAME",
                    help="write only these workflows (default: all)")
    args = ap.parse_args()
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    example_inputs(OUT / "inputs")
    for name, build in WORKFLOWS.items():
        if args.only and name not in args.only:
            continue
        api_path = OUT / "api" / f"{name}.json"
        write_json(api_path, build())
        if args.ui:
            ui_path = OUT / f"{name}.json"
            previous = json.loads(ui_path.read_text(encoding="utf-8")) if ui_path.is_file() else {}
            subprocess.run(["node", str(REPO / "scripts" / "ui_roundtrip.js"), args.ui, str(api_path),
                            str(ui_path), str(OUT / f"{name}.png")], check=True)
            write_json(ui_path, keep_ids(previous, json.loads(ui_path.read_text(encoding="utf-8"))))
            thumbnail(OUT / f"{name}.png")
        print("wrote", api_path)


if __name__ == "__main__":
    sys.exit(main())
