"""ComfyUI entry point of the GAN-RM node pack: clone this repository into ComfyUI/custom_nodes/.

ComfyUI imports this file; the nodes live in ganrm_nodes/ and all of their logic in ganrm_diffusers/. Importing it
loads no model, touches no network and does not even import ComfyUI: the nodes are imported when ComfyUI asks for
them, so the file is also harmless to tools (pytest, linters) that import the repository root as a package.
"""

import importlib.util
import os
import sys

# A clone that was not pip-installed still imports: its packages sit next to this file.
if importlib.util.find_spec("ganrm_nodes") is None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension with every GAN-RM node."""
    from ganrm_nodes.nodes import comfy_entrypoint as nodes_entrypoint

    return await nodes_entrypoint()


__all__ = ["comfy_entrypoint"]
