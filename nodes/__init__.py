"""ComfyUI nodes. Node modules import ComfyUI only inside methods, so this package imports without it."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
