"""Per-block record / replay on a Flux-style DiT through ComfyUI's ``patches_replace["dit"]`` hooks.

``BlockReplay(lf, lg)`` records each block's inputs and outputs; ``BlockReplay(lf, lg, replay=first)`` feeds the
recorded run's image tokens and free text stream into every block instead, so only the full text stream (the first
``lf`` text tokens) is this run's own: what the per-block guarantee holds fixed. ``lg`` is the free stream's length
(0: an unpatched model, one text stream). Only model calls that hold positive rows are recorded (ComfyUI may run a
negative alone); ``layout`` is the recorded call's ``cond_or_uncond``.
"""
from __future__ import annotations

import torch


def dit_keys(double: int, single: int) -> list[tuple[str, int]]:
    return [("double_block", i) for i in range(double)] + [("single_block", i) for i in range(single)]


class BlockReplay:
    def __init__(self, lf: int, lg: int, replay: "BlockReplay | None" = None) -> None:
        self.lf, self.lg, self.replay = lf, lg, replay
        self.inputs: dict = {}
        self.outputs: dict = {}
        self.layout: tuple = ()

    @property
    def positive(self) -> int:
        """The row of the positive prompt in the recorded call (ComfyUI may batch the negative first)."""
        return self.layout.index(0)

    @property
    def negatives(self) -> list[int]:
        return [r for r, c in enumerate(self.layout) if c != 0]

    def hooks(self, keys) -> dict:
        """``patches_replace["dit"]`` entries for ``keys``."""
        return {key: (lambda args, extra, key=key: self._block(key, args, extra)) for key in keys}

    def install(self, model, keys):
        """A clone of a ComfyUI ModelPatcher with the hooks set."""
        m = model.clone()
        for key, hook in self.hooks(keys).items():
            m.set_model_patch_replace(hook, "dit", *key)
        return m

    def _block(self, key, args, extra):
        args, lf = dict(args), self.lf
        layout = tuple((args.get("transformer_options") or {}).get("cond_or_uncond") or [0])
        if 0 not in layout:
            return extra["original_block"](args)  # a call of negative rows alone: not the one compared
        self.layout = layout
        if self.replay is not None:
            before = self.replay.inputs[key]
            if key[0] == "double_block":
                args["img"] = before["img"]
                args["txt"] = torch.cat([args["txt"][:, :lf], before["txt"][:, lf:]], 1)
            else:
                args["img"] = torch.cat([args["img"][:, :lf], before["img"][:, lf:]], 1)
        args = {k: (v.clone() if k in ("img", "txt") else v) for k, v in args.items()}  # blocks add in place
        self.inputs[key] = {k: v.clone() for k, v in args.items() if k in ("img", "txt")}
        out = extra["original_block"](args)
        self.outputs[key] = {k: v.clone() for k, v in out.items()}
        return out

    def image(self, key) -> torch.Tensor:
        """A block's output image tokens [B, N, W]."""
        out = self.outputs[key]["img"]
        return out if key[0] == "double_block" else out[:, self.lf + self.lg:]

    def free(self, key) -> torch.Tensor:
        """A block's output free text stream [B, lg, W]."""
        out = self.outputs[key]
        return out["txt"][:, self.lf:] if key[0] == "double_block" else out["img"][:, self.lf:self.lf + self.lg]
