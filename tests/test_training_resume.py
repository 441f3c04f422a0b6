"""Exact resumption: 20 steps straight == 10 steps, SIGKILL mid-checkpoint, ``--resume latest`` to 20 — on the
SD1.5-shaped and the SDXL-shaped (two text encoders, pooled embedding, time ids) tiny inpainting models, and on the
tiny Flux Fill set (T5 identifier vectors, transformer LoRA, joint confinement, flow-matching times)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from productbg.training import bgsynth, checkpoint as ckpt
from productbg.training.engine import FAULT_ENV

RUN = "import sys; from productbg.cli import main; sys.exit(main(sys.argv[1:]))"


def _args(data, out, *extra, model="tiny-inpaint"):
    # Flux confines by context only (no attention-mass loss); its prompts are T5's, 16 tokens here
    flux = ["--mask-mode", "hard", "--t5-min-length", "16"] if model.startswith("tiny-flux") else \
        ["--mask-mode", "both"]
    return ["train-cg", "--data", str(data), "--model", model, "--output", str(out), "--resolution", "32",
            "--max-steps", "20", "--batch-size", "2", "--vectors-per-id", "2", "--lora-rank", "4",
            "--checkpoint-every", "5", "--keep-checkpoints", "5", "--seed", "7", *flux, "--no-progress", *extra]


def _start(args, cwd, fault=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.Popen([sys.executable, "-c", RUN, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _log(out):
    return [json.loads(l) for l in (out / "loss_log.jsonl").read_text().splitlines()]


def _progress(out):
    """What changes while training moves on: the loss log's size and the checkpoint folders."""
    log = out / "loss_log.jsonl"
    roots = out / "checkpoints"
    return (log.stat().st_size if log.exists() else -1,
            sorted(p.name for p in roots.iterdir()) if roots.is_dir() else [], out.exists())


def _wait_for(path, proc, stall=900):
    """Wait until ``path`` exists while the run makes progress; fail only when it exits or stops progressing
    for ``stall`` seconds (a loaded CI machine is slow, not stuck: any new log line or checkpoint resets it)."""
    last, since = None, time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        now = _progress(path.parent)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall:
            proc.kill()
            pytest.fail(f"training made no progress for {stall} s before the fault point (last: {last})")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-inpaint", "tiny-sdxl-inpaint", "tiny-flux-fill"])
def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path, model):
    data = tmp_path / "data"
    bgsynth.generate(data, bgsynth.SynthSpec(categories=4, per_category=2, held_out=1, size=32, seed=1,
                                             names=("运动鞋", "手提包", "咖啡杯", "台灯")))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    a = _start(_args(data, straight, model=model), tmp_path)
    b = _start(_args(data, killed, model=model), tmp_path, fault="hold-in-checkpoint:15")
    _wait_for(killed / ".fault-held", b)
    os.kill(b.pid, signal.SIGKILL)
    b.wait(30)
    assert b.returncode == -signal.SIGKILL
    roots = killed / "checkpoints"
    assert (roots / "step-000015.tmp").is_dir() and not (roots / "step-000015").exists()
    assert len(_log(killed)) == 15                           # steps 11-15 were logged before the kill

    resumed = subprocess.run([sys.executable, "-c", RUN, *_args(data, killed, "--resume", "latest", model=model)], cwd=tmp_path,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "skipping checkpoint step-000015.tmp" in resumed.stderr and "resumed from step 10" in resumed.stdout
    out_a, _ = a.communicate(timeout=300)
    assert a.returncode == 0, out_a

    log_a, log_b = _log(straight), _log(killed)
    assert [r["step"] for r in log_b] == list(range(1, 21))
    for key in ("loss", "mse", "mass"):
        assert [r[key] for r in log_a] == [r[key] for r in log_b], key
    lora = "transformer_lora.safetensors" if model.startswith("tiny-flux") else "unet_lora.safetensors"
    for name in ("category_bank.safetensors", lora, "checkpoints/step-000020/trainable.safetensors"):
        ta, tb = load_file(str(straight / name)), load_file(str(killed / name))
        assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta), name
    assert ckpt.find_latest(roots).step == 20 and not list(roots.glob("*.tmp"))
