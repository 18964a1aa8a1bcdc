"""ComfyUI nodes for GAN-RM reward models (imported by ComfyUI through the repository's root __init__.py).

The nodes are in ganrm_nodes.nodes, which needs ComfyUI's modules; this package itself imports nothing from ComfyUI.
"""
