"""Which module registers each pass (``base.build_pass`` imports only the pass it builds, so a
plain compile never imports torch for the pruning or token passes)."""

PASS_MODULES = {"cleanup": "cleanup", "discover": "discover", "ort_fusion": "fuse", "precision": "precision",
                "prune": "prune", "quantize": "quantize", "semantic_tokens": "semantic_tokens",
                "lower_token_cluster": "semantic_tokens", "verify": "verify"}


def import_all() -> None:
    """Import every pass module (registering every pass)."""
    import importlib

    for module in sorted(set(PASS_MODULES.values())):
        importlib.import_module(f"{__package__}.{module}")
