"""Training runs on one process or under DDP only: FSDP, DeepSpeed and Megatron-LM accelerate setups are refused
with one line before anything is built (checked in one process, through accelerate's launch variables)."""
from __future__ import annotations

import pytest
from accelerate.utils import DistributedType

from productbg.cli import main
from productbg.training import bgsynth
from productbg.training.engine import EngineConfig, check_distributed, fit

LAUNCH_VARIABLES = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM")


@pytest.fixture(autouse=True)
def _no_launch_variables(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("kind, named", [(DistributedType.FSDP, "FSDP"), (DistributedType.DEEPSPEED, "DeepSpeed"),
                                         (DistributedType.MEGATRON_LM, "Megatron-LM"), ("FSDP", "FSDP")])
def test_sharded_distributed_types_refused(kind, named):
    with pytest.raises(ValueError, match=f"DDP only.*asks for {named}:") as e:
        check_distributed(kind)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", [None, DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU,
                                  "MULTI_XPU"])
def test_one_process_and_ddp_pass(kind):
    check_distributed(kind)


@pytest.mark.parametrize("variable, value, named", [("ACCELERATE_USE_FSDP", "true", "FSDP"),
                                                    ("ACCELERATE_USE_DEEPSPEED", "True", "DeepSpeed"),
                                                    ("ACCELERATE_USE_DEEPSPEED", "1", "DeepSpeed"),
                                                    ("ACCELERATE_USE_MEGATRON_LM", "true", "Megatron-LM")])
def test_launch_variables_refused(variable, value, named):
    """``accelerate launch`` with an FSDP / DeepSpeed (ZeRO-3 or any stage) config sets these for every process."""
    with pytest.raises(ValueError, match=f"asks for {named}:"):
        check_distributed(environ={variable: value})
    check_distributed(environ={variable: "false"})


class _MustNotBuild:
    """A task whose build fails the test: the refusal has to come first."""

    def build(self, device):
        raise AssertionError("the model was built before the distributed setup was checked")

    def fingerprint(self):
        return {}


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_fit_refuses_before_building(variable, monkeypatch, tmp_path):
    """The engine refuses before accelerate acts on the variable (which, for DeepSpeed, would first demand the
    package) and before the model is built."""
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ValueError, match="DDP only"):
        fit(_MustNotBuild(), EngineConfig(output_dir=tmp_path / "run", max_steps=1, progress=False, cpu=True))
    assert not (tmp_path / "run").exists()


def test_cli_train_refuses_fsdp_in_one_line(monkeypatch, tmp_path, capsys):
    data = tmp_path / "data"
    bgsynth.generate(data, bgsynth.SynthSpec(categories=2, per_category=1, held_out=0, size=32, seed=1))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    code = main(["train-cg", "--data", str(data), "--model", "tiny", "--output", str(tmp_path / "out"),
                 "--resolution", "32", "--max-steps", "1", "--no-progress", "--cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "DDP only" in err[0] and "FSDP" in err[0], err
