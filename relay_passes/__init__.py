"""Graph passes (Relax: TVM 0.27 has no Relay; the folder keeps the name the project was asked for)."""
from .sparse_conv_rewrite import plan_sites, rewrite_sparse_convs
from .split_k import split_k_matmuls

__all__ = ["plan_sites", "rewrite_sparse_convs", "split_k_matmuls"]
