"""An attn2 object shaped like ComfyUI_IPAdapter_plus' ``Attn2Replace``, for stacking tests and benchmarks."""
import math


class ForeignAttn2:
    """An attn2 object with ComfyUI_IPAdapter_plus' stacking interface (``.add``, sigma-gated callbacks)."""

    def __init__(self, callback, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = float(extra_options["sigmas"].flatten()[0]) if "sigmas" in extra_options else math.inf
        for cb, kw in zip(self.callback, self.kwargs):
            if kw["sigma_end"] <= sigma <= kw["sigma_start"]:
                out = out + cb(out, q, k, v, extra_options, **kw)
        return out
