"""Training state on disk without pickle: nested Python state as JSON + its tensors as safetensors.

Optimizer, LR-scheduler and RNG states are nested dicts/lists/tuples holding numbers, strings, tensors and
numpy arrays. :func:`pack` turns one into a JSON-able tree plus a flat ``{name: tensor}`` dict; :func:`unpack`
inverts it exactly (dict keys keep their types, tuples stay tuples, floats round-trip through ``repr``).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file, load_file

_T, _D, _TU, _ND = "__tensor__", "__dict__", "__tuple__", "__ndarray__"


def pack(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """JSON-able tree for ``obj``; tensors are moved into ``tensors`` under generated names."""
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}.{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {_T: name}
    if isinstance(obj, np.ndarray):
        return {_ND: obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {_D: [[pack(k, tensors, prefix), pack(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TU: [pack(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [pack(v, tensors, prefix) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a training checkpoint")


def unpack(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack`."""
    if isinstance(tree, list):
        return [unpack(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if _T in tree:
        return tensors[tree[_T]]
    if _ND in tree:
        return np.array(tree[_ND], dtype=tree["dtype"])
    if _D in tree:
        return {_hashable(unpack(k, tensors)): unpack(v, tensors) for k, v in tree[_D]}
    if _TU in tree:
        return tuple(unpack(v, tensors) for v in tree[_TU])
    raise ValueError(f"unknown entry in a training checkpoint: {sorted(tree)[:3]}")


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def save_tree(obj: Any, json_path: Path, tensors_path: Path, prefix: str = "t") -> None:
    """Write ``obj`` as ``json_path`` + ``tensors_path`` (plain writes: callers write inside a temp folder)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = pack(obj, tensors, prefix)
    save_file(tensors, str(tensors_path))
    json_path.write_text(json.dumps(tree))


def load_tree(json_path: Path, tensors_path: Path) -> Any:
    """Read what :func:`save_tree` wrote."""
    return unpack(json.loads(json_path.read_text()), load_file(str(tensors_path)))


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator for one micro-batch: a function of (seed, step, micro-batch, process) only."""
    mixed = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))


def load_trainables(own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], hint: str) -> None:
    """Copy a checkpoint's trainable tensors into the module's own (in place).

    Raises:
        ValueError: the checkpoint holds other tensors than the module trains (``hint`` says what may differ).
    """
    if set(own) != set(saved):
        raise ValueError(f"checkpoint tensors do not match this model ({hint})")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(saved[k])
