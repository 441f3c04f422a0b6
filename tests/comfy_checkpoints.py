"""Random full-size SD1.5 and SDXL checkpoints (plain and inpainting) that ComfyUI's model detection accepts.

Module level imports only the standard library: this file also runs as a script in a child process to build
the checkpoints (``python -P comfy_checkpoints.py build-checkpoints COMFYUI_DIR OUT_DIR``), where ``-P`` puts
nothing of ours on ``sys.path`` — so it imports no helper module at its top. ComfyUI's layers skip weight init
(``torch.empty``), so the builder initialises every layer itself.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

CKPT_SUBDIR = "productbg_test"               # inside <ComfyUI>/models/checkpoints
CKPT_SD15 = f"{CKPT_SUBDIR}/random_sd15.safetensors"
CKPT_INPAINT = f"{CKPT_SUBDIR}/random_sd15_inpaint.safetensors"
CKPT_SDXL = f"{CKPT_SUBDIR}/random_sdxl.safetensors"
CKPT_SDXL_INPAINT = f"{CKPT_SUBDIR}/random_sdxl_inpaint.safetensors"
CKPT_MARKER_KEY = "productbg_test_checkpoint"
CKPT_VERSION = "1"                           # bump to rebuild cached checkpoints everywhere
CKPT_SEED = 0


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a .safetensors file, reading only its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__") or {}


def _checkpoint_ok(path: Path, kind: str) -> bool:
    try:
        return read_safetensors_metadata(path).get(CKPT_MARKER_KEY) == f"{CKPT_VERSION}:{kind}"
    except (OSError, ValueError, struct.error):
        return False


def ensure_checkpoints(comfyui_dir: str | os.PathLike, python: str = sys.executable) -> dict[str, str]:
    """Build the random SD1.5 checkpoints into ``<ComfyUI>/models/checkpoints/productbg_test/`` unless present.

    Returns ``{"sd15": <ckpt_name>, "inpaint": <ckpt_name>, "dir": <folder>}``; ckpt names are what
    ``CheckpointLoaderSimple`` takes. A build takes ≈20-30 s and ≈10 GB RAM in a child process; the files
    (2 GB each, fp16) are reused by later sessions while their version marker matches.
    """
    out_dir = _build_once(comfyui_dir, python, {"sd15": CKPT_SD15, "inpaint": CKPT_INPAINT}, "build-checkpoints",
                          ".build.lock")
    return {"sd15": CKPT_SD15, "inpaint": CKPT_INPAINT, "dir": str(out_dir)}


def ensure_sdxl_checkpoints(comfyui_dir: str | os.PathLike, python: str = sys.executable) -> dict[str, str]:
    """Build the random full-size SDXL and SDXL-inpainting checkpoints (one child process) unless present.

    Returns ``{"sdxl": <ckpt_name>, "inpaint": <ckpt_name>, "dir": <folder>}``. The UNet is built and initialised
    in fp16 and the files are written tensor by tensor, so the child's peak stays ≈8 GB (not the ≈10 GB of an
    fp32 UNet, plus a serialised copy); ≈7 GB per file, reused while the version marker matches.
    """
    out_dir = _build_once(comfyui_dir, python, {"sdxl": CKPT_SDXL, "sdxl_inpaint": CKPT_SDXL_INPAINT},
                          "build-sdxl-checkpoints", ".build-sdxl.lock")
    return {"sdxl": CKPT_SDXL, "inpaint": CKPT_SDXL_INPAINT, "dir": str(out_dir)}


def _build_once(comfyui_dir, python: str, kinds: dict[str, str], command: str, lock_name: str) -> Path:
    """Run ``command`` of this file in a child process unless every checkpoint of ``kinds`` (kind -> ckpt name)
    carries its version marker; a file lock keeps two sessions from building the same files. Returns the folder."""
    import fcntl

    from comfy_env import child_env            # here, not at the top: the child process runs this file alone

    out_dir = Path(comfyui_dir, "models", "checkpoints", CKPT_SUBDIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = {k: Path(comfyui_dir, "models", "checkpoints", name) for k, name in kinds.items()}
    with open(out_dir / lock_name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(_checkpoint_ok(p, k) for k, p in targets.items()):
            proc = subprocess.run([python, "-P", __file__, command, str(comfyui_dir), str(out_dir)],
                                  env=child_env(), capture_output=True, text=True)
            if proc.returncode != 0 or not all(_checkpoint_ok(p, k) for k, p in targets.items()):
                raise RuntimeError(f"{command} failed (rc {proc.returncode}):\n"
                                   f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
            print(proc.stdout.strip(), file=sys.stderr)
    return out_dir


def _build_sdxl_checkpoints(comfyui_dir: str, out_dir: str) -> None:
    """Child-process entry: random weights in SDXL base shapes (UNet, CLIP-L + CLIP-G, VAE), the original
    checkpoint key layout (ComfyUI's own for-saving conversions), fp16, verified by ComfyUI's detection."""
    t0 = time.time()
    sys.path.insert(0, comfyui_dir)
    from comfy.cli_args import args

    args.cpu = True
    import torch

    import comfy.model_detection
    import comfy.sdxl_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(CKPT_SEED)
    half = torch.float16
    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
        channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10, context_dim=2048,
        num_heads=-1, num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
        legacy=False, num_classes="sequential", adm_in_channels=2816, use_checkpoint=False,
        use_temporal_attention=False, use_temporal_resblock=False, dtype=half)
    _random_init(unet)
    config = comfy.supported_models.SDXL({"model_channels": 320, "use_linear_in_transformer": True,
                                          "transformer_depth": [0, 0, 2, 2, 10, 10], "context_dim": 2048,
                                          "adm_in_channels": 2816, "use_temporal_attention": False})
    sd = config.process_unet_state_dict_for_saving(unet.state_dict())
    del unet
    clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=half)
    _random_init(clip)
    sd.update(config.process_clip_state_dict_for_saving(clip.state_dict()))
    del clip
    vae = AutoencoderKL(embed_dim=4, ddconfig=dict(
        double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
        num_res_blocks=2, attn_resolutions=[], dropout=0.0))
    _random_init(vae)
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    del vae
    sd = {k: _to_fp16(v) for k, v in sd.items()}
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    w4 = sd[conv_in]
    extra = torch.empty(w4.shape[0], 5, *w4.shape[2:]).uniform_(-1, 1) * (1.0 / (9 * 9) ** 0.5)
    w9 = torch.cat([w4.float() * (4 / 9) ** 0.5, extra], dim=1).half().contiguous()
    for kind, name, conv in (("sdxl", CKPT_SDXL, w4), ("sdxl_inpaint", CKPT_SDXL_INPAINT, w9)):
        sd[conv_in] = conv
        detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
        got = type(detected).__name__ if detected is not None else None
        assert got == "SDXL", f"{name}: ComfyUI detects {got}, not SDXL"
        assert detected.inpaint_model() == (kind == "sdxl_inpaint"), f"{name}: inpaint detection wrong"
        out = os.path.join(out_dir, os.path.basename(name))
        partial = f"{out}.partial-{os.getpid()}"
        _save_streaming(sd, partial, {CKPT_MARKER_KEY: f"{CKPT_VERSION}:{kind}",
                                      "note": "random weights with SDXL base shapes, for tests; outputs are noise"})
        os.replace(partial, out)
        n = sum(v.numel() for v in sd.values())
        print(f"built {out}: {len(sd)} tensors, {n / 1e6:.0f}M params, detected {got}"
              f"{' inpaint' if kind == 'sdxl_inpaint' else ''}, {time.time() - t0:.1f}s")


_ST_DTYPES = {"torch.float16": "F16", "torch.float32": "F32", "torch.int64": "I64", "torch.bfloat16": "BF16"}


def _save_streaming(tensors: dict, path: str, metadata: dict[str, str]) -> None:
    """Write a .safetensors file one tensor at a time (safetensors' ``save_file`` first serialises the whole
    dict into memory: +7 GB for an SDXL checkpoint)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for k, v in tensors.items():
        size = v.numel() * v.element_size()
        header[k] = {"dtype": _ST_DTYPES[str(v.dtype)], "shape": list(v.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for v in tensors.values():
            f.write(v.detach().contiguous().reshape(-1).view(__import__("torch").uint8).numpy().data)


def _build_checkpoints(comfyui_dir: str, out_dir: str) -> None:
    """Child-process entry: random weights, SD1.5 shapes, original LDM key layout, fp16, verified by detection."""
    t0 = time.time()
    sys.path.insert(0, comfyui_dir)
    from comfy.cli_args import args

    args.cpu = True
    import torch
    from safetensors.torch import save_file

    import comfy.model_detection
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(CKPT_SEED)
    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
        context_dim=768, num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
        use_linear_in_transformer=False, legacy=False, adm_in_channels=None, use_checkpoint=False,
        use_temporal_attention=False, use_temporal_resblock=False, dtype=torch.float32)
    vae = AutoencoderKL(embed_dim=4, ddconfig=dict(
        double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
        num_res_blocks=2, attn_resolutions=[], dropout=0.0))
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    shared: dict[str, Any] = {}
    for prefix, module in (("first_stage_model.", vae), ("cond_stage_model.", clip)):
        _random_init(module)
        for k, v in module.state_dict().items():
            if prefix == "cond_stage_model." and k in ("logit_scale", "transformer.text_projection.weight"):
                continue                          # not in SD1.5 checkpoints
            shared[prefix + k] = _to_fp16(v)
    _random_init(unet)
    unet_sd = {"model.diffusion_model." + k: _to_fp16(v) for k, v in unet.state_dict().items()}
    del unet, vae, clip

    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    w4 = unet_sd[conv_in]                         # [320, 4, 3, 3]
    # SD1.5-inpainting = the same UNet with 9 input channels: latent 4 + mask 1 + masked-image latent 4.
    extra = torch.empty(w4.shape[0], 5, *w4.shape[2:]).uniform_(-1, 1) * (1.0 / (9 * 9) ** 0.5)
    w9 = torch.cat([w4.float() * (4 / 9) ** 0.5, extra], dim=1).half().contiguous()

    for kind, name, conv in (("sd15", CKPT_SD15, w4), ("inpaint", CKPT_INPAINT, w9)):
        sd = {**unet_sd, conv_in: conv, **shared}
        config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
        got = type(config).__name__ if config is not None else None
        assert got == "SD15", f"{name}: ComfyUI detects {got}, not SD15"
        assert config.inpaint_model() == (kind == "inpaint"), f"{name}: inpaint detection wrong"
        out = os.path.join(out_dir, os.path.basename(name))
        partial = f"{out}.partial-{os.getpid()}"
        save_file(sd, partial, metadata={CKPT_MARKER_KEY: f"{CKPT_VERSION}:{kind}",
                                         "note": "random weights with SD1.5 shapes, for tests; outputs are noise"})
        os.replace(partial, out)
        n = sum(v.numel() for v in sd.values())
        print(f"built {out}: {len(sd)} tensors, {n / 1e6:.0f}M params, detected {got}"
              f"{' inpaint' if kind == 'inpaint' else ''}, {time.time() - t0:.1f}s")


def _to_fp16(v):
    return (v.half() if v.is_floating_point() else v).contiguous()


def _random_init(module) -> None:
    """torch's default init for Linear/Conv, unit norms, N(0, 0.02) embeddings (ComfyUI's ops skip init)."""
    import math

    import torch

    with torch.no_grad():
        for m in module.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                if m.bias is not None:
                    bound = 1 / math.sqrt(w[0].numel())
                    torch.nn.init.uniform_(m.bias, -bound, bound)
            elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if w is not None:
                    torch.nn.init.ones_(w)
                if getattr(m, "bias", None) is not None:
                    torch.nn.init.zeros_(m.bias)
            elif isinstance(m, torch.nn.Embedding):
                torch.nn.init.normal_(w, std=0.02)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "build-checkpoints":
        try:
            _build_checkpoints(sys.argv[2], sys.argv[3])
        except BaseException:
            traceback.print_exc()
            sys.exit(1)
    elif len(sys.argv) == 4 and sys.argv[1] == "build-sdxl-checkpoints":
        try:
            _build_sdxl_checkpoints(sys.argv[2], sys.argv[3])
        except BaseException:
            traceback.print_exc()
            sys.exit(1)
    else:
        sys.exit("usage: python -P comfy_checkpoints.py build-checkpoints|build-sdxl-checkpoints COMFYUI_DIR OUT_DIR")
