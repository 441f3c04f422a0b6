"""bench/gpu_check.sh's argument handling, unpatched-graph rewiring and JSON summary (no ComfyUI, no GPU).

The check itself (`bash bench/gpu_check.sh --cpu`) runs as a step of .ci/run: a run takes minutes on a CPU.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_needs_no_gpu_and_no_carry_folder():
    env = dict(os.environ, PYTHON=sys.executable, PRODUCTBG_PY=sys.executable)
    for mode in ([], ["--cpu"]):
        out = subprocess.run(["bash", str(SCRIPT), *mode, "--help"], env={**env, "COMFYUI_DIR": "/nonexistent"},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "--json-out" in out.stdout and "--cpu" in out.stdout


def test_cpu_needs_comfyui_dir():
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_DIR"}
    out = subprocess.run(["bash", str(SCRIPT), "--cpu"], env={**env, "PRODUCTBG_PY": sys.executable},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "COMFYUI_DIR" in out.stderr


def test_defaults_are_full_size_on_the_gpu_and_tiny_with_cpu():
    g = _gpu_check()
    gpu, cpu = g.parse_args([]), g.parse_args(["--cpu"])
    assert (gpu.size, gpu.sdxl_size, gpu.train_model, gpu.train_steps, gpu.warmup) == (512, 1024, "sd15", 20, True)
    assert (cpu.size, cpu.sdxl_size, cpu.train_model, cpu.warmup) == (64, 64, "tiny", False)
    assert any(n.endswith("_sdxl") for n in g.CPU_WORKFLOWS)  # CI runs the SDXL path the GPU run takes
    shipped = sorted(p.stem for p in (REPO / "workflows" / "api").glob("*.json"))
    assert gpu.workflows == shipped and g.parse_args(["--cpu", "--workflows", "all"]).workflows == shipped
    assert cpu.workflows == list(g.CPU_WORKFLOWS)
    assert g.parse_args(["--steps", "3", "--only", "train"]).steps == 3
    # the Flux pipeline and Flux train-cg run by default, as phases of their own (the SD phases' keys unchanged)
    assert gpu.only == cpu.only == ["comfyui", "diffusers", "diffusers_flux", "train", "train_flux"]
    assert (gpu.flux_train_steps, cpu.flux_train_steps) == (6, 1)
    assert g.parse_args(["--cpu", "--only", "diffusers_flux,train_flux"]).only == ["diffusers_flux", "train_flux"]
    with pytest.raises(SystemExit):
        g.parse_args(["--only", "flux"])


def test_a_false_check_is_named_and_fails_the_phase():
    g = _gpu_check()
    assert g.failed_checks({}) == [] and g.failed_checks({"checks": {"patched": {"finite": True}}}) == []
    info = {"checks": {"patched": {"finite": True, "core_bit_exact": False}, "unpatched": {"finite": False}}}
    assert g.failed_checks(info) == ["patched.core_bit_exact", "unpatched.finite"]


def test_unpatched_graph_wires_the_sampler_past_every_patch_node():
    g = _gpu_check()
    for path in sorted((REPO / "workflows" / "api").glob("*.json")):
        prompt = json.loads(path.read_text(encoding="utf-8"))
        prompt = prompt.get("prompt", prompt)
        plain = g.bypass_patches(prompt)
        assert plain.keys() == prompt.keys()
        (sampler,) = [n for n in plain.values() if n["class_type"] == "KSampler"]
        source = plain[sampler["inputs"]["model"][0]]
        assert source["class_type"] not in g.PATCH_NODES, path.name
        patched_source = prompt[[n for n in prompt.values() if n["class_type"] == "KSampler"][0]["inputs"]["model"][0]]
        assert patched_source["class_type"] in g.PATCH_NODES, path.name   # the shipped graph is patched
        assert json.loads(path.read_text(encoding="utf-8")).get("prompt", prompt) == prompt   # input untouched


def test_summary_schema():
    g = _gpu_check()
    meter = g.Meter(cuda=False)
    for variant, dt in (("patched", 2.2), ("unpatched", 2.0), ("patched", 2.4)):
        with meter.measure(variant, 2):
            pass
        meter.samples[variant][-1] = (dt, 2, None, None)
    s = meter.summary()
    assert s["patched"] == {"s_per_step": 1.15, "peak_mib": None, "increment_mib": None, "runs": 2}
    assert s["unpatched"]["s_per_step"] == 1.0 and s["ratio"] == 1.15
    assert "patch_ratio" not in s  # no identifier-only variant measured


def test_identifier_variant_separates_the_patch_from_the_style_feature():
    """With both patch nodes the graph gets an identifier-only variant; the summary gives the patch's overhead and
    memory increment apart from the style feature's (rows: seconds, steps, peak, increment over resident)."""
    g = _gpu_check()
    prompt = json.loads((REPO / "workflows" / "api" / "reference_style.json").read_text(encoding="utf-8"))
    graphs = g.variants(prompt.get("prompt", prompt))
    assert set(graphs) == {"patched", "unpatched", "identifier"}
    classes = {n["class_type"] for n in graphs["identifier"].values() if n["class_type"] in g.PATCH_NODES}
    (sampler,) = [n for n in graphs["identifier"].values() if n["class_type"] == "KSampler"]
    assert graphs["identifier"][sampler["inputs"]["model"][0]]["class_type"] == "ProductBGMaskGuidedAttention"
    assert "ProductBGReferenceStyle" in classes  # still in the graph, just no longer on the sampler's path
    meter = g.Meter(cuda=False)
    meter.samples = {"unpatched": [(2.0, 2, 5000.0, 300.0)], "identifier": [(2.1, 2, 5010.0, 310.0)],
                     "patched": [(2.4, 2, 5100.0, 400.0)]}
    s = meter.summary()
    assert (s["patch_ratio"], s["style_ratio"], s["ratio"]) == (1.05, round(2.4 / 2.1, 4), 1.2)
    assert (s["patch_increment_mib"], s["style_increment_mib"]) == (10.0, 90.0)
