"""Random full-size Flux.1 model files for the real-ComfyUI tests, built once and cached; no download.

Every file has the key layout and shapes of the published file ComfyUI users load, with seeded random values
(N(0, 0.02) weights and biases, norm scales 1, norm biases 0); shapes come from ComfyUI 0.3.75's own modules built
on the meta device, so no full fp32 copy of anything is ever made: each tensor is drawn, cast and written to the
file on its own (the builder's peak RSS is 1.5 GiB, not the 19 GB of an fp32 T5-XXL).

==========  =====================  ========================================  =========================================
key         ComfyUI folder         file (under ``productbg_test/``)          what (ComfyUI detects)
==========  =====================  ========================================  =========================================
dev         diffusion_models       flux1-dev.safetensors                     Flux.1-dev transformer, full width (3072,
                                                                             24 heads), 1 double + 1 single block, bf16
                                                                             (``Flux``)
fill        diffusion_models       flux1-fill-dev.safetensors                the same with img_in over 384 features
                                                                             (``FluxInpaint``)
schnell     diffusion_models       flux1-schnell.safetensors                 the same without guidance_in
                                                                             (``FluxSchnell``)
t5xxl       text_encoders          t5xxl_fp8_e4m3fn.safetensors              full-size T5-XXL encoder (24 layers, 4.76B
                                                                             params): every encoder tensor fp8 e4m3fn,
                                                                             ``shared.weight`` fp16, as published
clip_l      text_encoders          clip_l.safetensors                        CLIP-L text model (``text_model.*``), fp16
vae         vae                    ae.safetensors                            Flux VAE (16 latent channels), fp32
redux       style_models           flux1-redux-dev.safetensors               Redux image encoder (redux_up/down), bf16
siglip      clip_vision            sigclip_vision_patch14_384.safetensors    SigLIP so400m patch14-384 vision tower
                                                                             (+ its pooling head, unused), fp16
==========  =====================  ========================================  =========================================

The dev, fill and schnell files share every tensor they have in common (the seed is per key). Files live in
``~/.cache/productbg/flux-random/`` (or ``$PRODUCTBG_FLUX_CACHE``) and are reused while the ``productbg_test_flux``
marker in their safetensors metadata reads ``VERSION:key``; the metadata also keeps ``productbg_build_seconds``.
≈9.7 GB in all, built in one child process (``python -P flux_checkpoint.py build COMFYUI_DIR OUT_DIR KEY...``)
under a file lock; each file is written to a temp file and renamed.

API (what tests use):

- :func:`ensure_flux_files` ``(comfyui_dir=None, keys=None) -> {key: Path}``: the cached files, built if missing.
- :func:`place_in_comfyui` ``(comfyui_dir, paths) -> {key: loader name}``: symlinks them into
  ``<ComfyUI>/models/<folder>/productbg_test/`` and returns the names ComfyUI's loader nodes take.
- :func:`flux_files` ``(comfyui_dir) -> FluxFiles``: both (the ``comfy_flux_files`` fixture of conftest.py);
  ``files["dev"]`` is a loader name, ``files.paths["dev"]`` the file.
- :func:`loader_nodes` ``(files, model="dev") -> {node id: API node}``: ``unet`` (UNETLoader), ``clip``
  (DualCLIPLoader, type flux), ``vae`` (VAELoader), ``style`` (StyleModelLoader), ``vision`` (CLIPVisionLoader).

Module level imports only the standard library (the child process runs this file alone).
"""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

VERSION = "1"                 # bump to rebuild every cached file
MARKER = "productbg_test_flux"
SEED = 0
SUBDIR = "productbg_test"     # inside each ComfyUI models folder
STD = 0.02

#: key -> (ComfyUI models folder, file name)
FILES: dict[str, tuple[str, str]] = {
    "dev": ("diffusion_models", "flux1-dev.safetensors"),
    "fill": ("diffusion_models", "flux1-fill-dev.safetensors"),
    "schnell": ("diffusion_models", "flux1-schnell.safetensors"),
    "t5xxl": ("text_encoders", "t5xxl_fp8_e4m3fn.safetensors"),
    "clip_l": ("text_encoders", "clip_l.safetensors"),
    "vae": ("vae", "ae.safetensors"),
    "redux": ("style_models", "flux1-redux-dev.safetensors"),
    "siglip": ("clip_vision", "sigclip_vision_patch14_384.safetensors"),
}
#: the Flux transformer's hyper-parameters (Flux.1-dev's, but 1 double + 1 single block instead of 19 + 38)
FLUX_PARAMS = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                   hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1,
                   axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
REDUX_TOKENS = 729            # SigLIP-384 patch14: 27 × 27 image tokens, one Redux token each


def cache_dir() -> Path:
    return Path(os.environ.get("PRODUCTBG_FLUX_CACHE") or Path.home() / ".cache" / "productbg" / "flux-random")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A .safetensors file's ``__metadata__`` (header only); {} when unreadable."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error):
        return {}


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """The tensors of a .safetensors file as ``{key: {"dtype", "shape", "data_offsets"}}`` (header only)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _ok(path: Path, key: str) -> bool:
    return read_metadata(path).get(MARKER) == f"{VERSION}:{key}"


def ensure_flux_files(comfyui_dir: str | os.PathLike | None = None, keys: Iterable[str] | None = None,
                      python: str = sys.executable) -> dict[str, Path]:
    """The cached random Flux files ``{key: path}`` (all of :data:`FILES`, or ``keys``), built first where missing
    or stale, in one child process that imports ComfyUI from ``comfyui_dir`` (default ``$COMFYUI_DIR``).

    A file lock in the cache folder keeps two processes from building at once. A full build writes ≈9.7 GB."""
    import fcntl

    keys = list(keys or FILES)
    unknown = set(keys) - set(FILES)
    if unknown:
        raise KeyError(f"unknown Flux test files {sorted(unknown)}; known: {sorted(FILES)}")
    out = cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / FILES[k][1] for k in keys}
    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = [k for k in keys if not _ok(paths[k], k)]
        if missing:
            comfyui_dir = comfyui_dir or os.environ.get("COMFYUI_DIR")
            if not comfyui_dir:
                raise RuntimeError("building the random Flux files needs ComfyUI's code: set COMFYUI_DIR")
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
            env.pop("PYTHONPATH", None)
            proc = subprocess.run([python, "-P", __file__, "build", str(comfyui_dir), str(out), *missing],
                                  env=env, capture_output=True, text=True)
            bad = [k for k in missing if not _ok(paths[k], k)]
            if proc.returncode != 0 or bad:
                raise RuntimeError(f"building the random Flux files {bad or missing} failed (rc {proc.returncode}):\n"
                                   f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
            print(proc.stdout.strip(), file=sys.stderr)
    return paths


def place_in_comfyui(comfyui_dir: str | os.PathLike, paths: dict[str, Path]) -> dict[str, str]:
    """Symlink each file into ``<ComfyUI>/models/<folder>/productbg_test/`` (replacing a stale link) and return
    ``{key: name}``, the name ComfyUI's loader node takes (``productbg_test/flux1-dev.safetensors``)."""
    names = {}
    for key, path in paths.items():
        folder, name = FILES[key]
        link = Path(comfyui_dir, "models", folder, SUBDIR, name)
        link.parent.mkdir(parents=True, exist_ok=True)
        target = Path(path).resolve()
        if not (link.is_symlink() and Path(os.readlink(link)) == target):
            tmp = link.with_name(f".{name}.link-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, link)
        names[key] = f"{SUBDIR}/{name}"
    return names


@dataclass(frozen=True)
class FluxFiles:
    """``names``: key -> loader name (what UNETLoader / DualCLIPLoader / VAELoader / StyleModelLoader /
    CLIPVisionLoader take); ``paths``: key -> cached file. ``files[key]`` is ``files.names[key]``."""

    names: dict[str, str]
    paths: dict[str, Path] = field(repr=False)

    def __getitem__(self, key: str) -> str:
        return self.names[key]

    def build_seconds(self) -> dict[str, float]:
        """How long each file took to build (recorded in its metadata when it was built)."""
        return {k: float(read_metadata(p).get("productbg_build_seconds", "nan")) for k, p in self.paths.items()}


def flux_files(comfyui_dir: str | os.PathLike, keys: Iterable[str] | None = None) -> FluxFiles:
    """Build (once) and place the random Flux files in ``comfyui_dir``'s models folders."""
    paths = ensure_flux_files(comfyui_dir, keys)
    return FluxFiles(place_in_comfyui(comfyui_dir, paths), paths)


def loader_nodes(files: FluxFiles | dict[str, str], model: str = "dev", weight_dtype: str = "default") -> dict:
    """API-format loader nodes for the random files: ``unet`` (UNETLoader of ``model``: dev, fill or schnell),
    ``clip`` (DualCLIPLoader, type flux: CLIP-L + T5-XXL), ``vae`` (VAELoader), ``style`` (StyleModelLoader, the
    Redux model), ``vision`` (CLIPVisionLoader, SigLIP). Outputs: ``["unet", 0]`` MODEL, ``["clip", 0]`` CLIP, ..."""
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": files[model], "weight_dtype": weight_dtype}},
        "clip": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": files["clip_l"], "clip_name2": files["t5xxl"],
                                                            "type": "flux"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}},
        "style": {"class_type": "StyleModelLoader", "inputs": {"style_model_name": files["redux"]}},
        "vision": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": files["siglip"]}},
    }


# ------------------------------------------------------------------------------------------- the child process
#: a tensor to write: key, shape, dtype (a torch dtype) and how to fill it ("normal", "ones", "zeros")
Spec = tuple[str, tuple[int, ...], object, str]
_ST_DTYPES = {"torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float32": "F32",
              "torch.float8_e4m3fn": "F8_E4M3"}


def _fills(module) -> dict[str, str]:
    """key -> "ones" / "zeros" / "normal" for a module's state dict: norm weights and scales 1, norm biases 0."""
    fills = {}
    for name, mod in module.named_modules():
        is_norm = "Norm" in type(mod).__name__
        for pname, _ in mod.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            fills[key] = ("zeros" if pname == "bias" else "ones") if is_norm else "normal"
    return fills


def _specs(module, dtype, dtype_of: Callable[[str], object] | None = None) -> list[Spec]:
    fills = _fills(module)
    return [(k, tuple(v.shape), dtype_of(k) if dtype_of else dtype, fills.get(k, "normal"))
            for k, v in module.state_dict().items()]


def _tensor(group: str, key: str, shape, dtype, fill: str):
    import torch

    if fill == "ones":
        return torch.ones(shape, dtype=dtype)
    if fill == "zeros":
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(SEED * 1_000_003 + zlib.crc32(f"{group}:{key}".encode()))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, STD, generator=g).to(dtype)


def _write(path: Path, group: str, specs: list[Spec], metadata: dict[str, str], t0: float) -> float:
    """Write a .safetensors file one tensor at a time (header first, from the specs), atomically; the metadata's
    ``productbg_build_seconds`` (seconds since ``t0``) is filled in just before the rename. Returns those seconds."""
    import torch
    from productbg.fileio import write_atomically

    def header_bytes(seconds: float) -> bytes:
        header: dict = {"__metadata__": {**metadata, "productbg_build_seconds": f"{seconds:09.1f}"}}
        offset = 0
        for key, shape, dtype, _ in specs:
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": _ST_DTYPES[str(dtype)], "shape": list(shape),
                           "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)

    raw = header_bytes(0.0)
    seconds = 0.0

    def fill(tmp: Path) -> None:
        nonlocal seconds
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for key, shape, dtype, how in specs:
                t = _tensor(group, key, shape, dtype, how)
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del t
            seconds = time.time() - t0
            final = header_bytes(seconds)
            assert len(final) == len(raw)
            f.seek(8)
            f.write(final)

    write_atomically(path, fill)
    return seconds


def _flux_specs(kind: str) -> list[Spec]:
    import torch

    import comfy.ldm.flux.model
    import comfy.ops

    params = dict(FLUX_PARAMS, guidance_embed=kind != "schnell", in_channels=96 if kind == "fill" else 16)
    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, **params)
    return _specs(model, torch.bfloat16)


def _t5_specs() -> list[Spec]:
    import torch

    import comfy.ops
    import comfy.text_encoders.t5 as t5

    config = json.loads((Path(t5.__file__).parent / "t5_config_xxl.json").read_text())
    with torch.device("meta"):
        model = t5.T5(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    # As the published t5xxl_fp8_e4m3fn.safetensors: the embedding 16-bit, every encoder tensor (linears, norms,
    # the relative attention bias) fp8 e4m3fn. ComfyUI reads the T5 dtype from encoder.final_layer_norm.weight.
    return _specs(model, None, lambda k: torch.float16 if k == "shared.weight" else torch.float8_e4m3fn)


def _clip_l_specs() -> list[Spec]:
    import torch

    import comfy.clip_model
    import comfy.ops

    config = json.loads(Path(comfy.clip_model.__file__).with_name("sd1_clip_config.json").read_text())
    with torch.device("meta"):
        model = comfy.clip_model.CLIPTextModel(config, torch.float16, "meta", comfy.ops.disable_weight_init)
    # The published clip_l.safetensors holds the text model only (Flux uses the unprojected pooled output), so
    # ComfyUI logs "clip missing: ['text_projection.weight']" for it, and for this file too.
    return [s for s in _specs(model, torch.float16) if s[0].startswith("text_model.")]


def _vae_specs() -> list[Spec]:
    import torch

    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        model = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    return _specs(model, torch.float32)


def _redux_specs() -> list[Spec]:
    import torch

    from comfy.ldm.flux.redux import ReduxImageEncoder

    with torch.device("meta"):
        model = ReduxImageEncoder()
    return _specs(model, torch.bfloat16)


def _siglip_specs() -> list[Spec]:
    import torch

    import comfy.clip_model
    import comfy.ops

    config = json.loads(Path(comfy.clip_model.__file__).with_name("clip_vision_siglip_384.json").read_text())
    with torch.device("meta"):
        model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "meta", comfy.ops.disable_weight_init)
    specs = _specs(model, torch.float16)
    # The published file also holds SigLIP's attention-pooling head, which ComfyUI does not use (its loader drops
    # unused keys); written too so that the file is the published one's shape.
    d, ff, h = config["hidden_size"], config["intermediate_size"], torch.float16
    head = [("vision_model.head.probe", (1, 1, d), "normal"),
            ("vision_model.head.attention.in_proj_weight", (3 * d, d), "normal"),
            ("vision_model.head.attention.in_proj_bias", (3 * d,), "normal"),
            ("vision_model.head.attention.out_proj.weight", (d, d), "normal"),
            ("vision_model.head.attention.out_proj.bias", (d,), "normal"),
            ("vision_model.head.layernorm.weight", (d,), "ones"),
            ("vision_model.head.layernorm.bias", (d,), "zeros"),
            ("vision_model.head.mlp.fc1.weight", (ff, d), "normal"),
            ("vision_model.head.mlp.fc1.bias", (ff,), "normal"),
            ("vision_model.head.mlp.fc2.weight", (d, ff), "normal"),
            ("vision_model.head.mlp.fc2.bias", (d,), "normal")]
    return specs + [(k, s, h, f) for k, s, f in head]


def _check(key: str, specs: list[Spec]) -> str:
    """What ComfyUI's own detection makes of the keys and shapes (meta tensors); raises when it is not the goal."""
    import torch

    sd = {k: torch.empty(s, dtype=d, device="meta") for k, s, d, _ in specs}
    if key in ("dev", "fill", "schnell"):
        import comfy.model_detection

        config = comfy.model_detection.model_config_from_unet(sd, "")
        got = type(config).__name__ if config is not None else None
        want = {"dev": "Flux", "fill": "FluxInpaint", "schnell": "FluxSchnell"}[key]
        uc = config.unet_config if config is not None else {}
        assert got == want and uc["depth"] == 1 and uc["depth_single_blocks"] == 1 and uc["hidden_size"] == 3072, \
            f"{key}: ComfyUI detects {got} {uc}"
        return f"{got} (depth {uc['depth']}+{uc['depth_single_blocks']}, hidden {uc['hidden_size']})"
    if key in ("t5xxl", "clip_l"):
        import comfy.sd

        got = comfy.sd.detect_te_model(sd)
        assert got == {"t5xxl": comfy.sd.TEModel.T5_XXL, "clip_l": comfy.sd.TEModel.CLIP_L}[key], f"{key}: {got}"
        return str(got)
    return "-"


_BUILDERS = {"dev": lambda: _flux_specs("dev"), "fill": lambda: _flux_specs("fill"),
             "schnell": lambda: _flux_specs("schnell"), "t5xxl": _t5_specs, "clip_l": _clip_l_specs,
             "vae": _vae_specs, "redux": _redux_specs, "siglip": _siglip_specs}


def _build(comfyui_dir: str, out_dir: str, keys: list[str]) -> None:
    sys.path.insert(0, comfyui_dir)
    from comfy.cli_args import args

    args.cpu = True
    import resource

    from productbg.fileio import TMP_SUFFIX

    for stale in Path(out_dir).glob(f".*{TMP_SUFFIX}"):   # a killed build's temp files (we hold the lock)
        stale.unlink(missing_ok=True)
    for key in keys:
        t0 = time.time()
        specs = _BUILDERS[key]()
        detected = _check(key, specs)
        group = "flux" if key in ("dev", "fill", "schnell") else key
        path = Path(out_dir, FILES[key][1])
        seconds = _write(path, group, specs, {"format": "pt", MARKER: f"{VERSION}:{key}", "note": (
            "random weights with published Flux.1 shapes, for tests; outputs are noise")}, t0)
        n = sum(math.prod(s) for _, s, _, _ in specs)
        print(f"built {path.name}: {len(specs)} tensors, {n / 1e6:.0f}M params, {path.stat().st_size / 1e9:.2f} GB, "
              f"detected {detected}, {seconds:.1f} s, child peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB", flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "build":
        try:
            _build(sys.argv[2], sys.argv[3], sys.argv[4:])
        except BaseException:
            traceback.print_exc()
            sys.exit(1)
    else:
        sys.exit("usage: python -P flux_checkpoint.py build COMFYUI_DIR OUT_DIR KEY...")
