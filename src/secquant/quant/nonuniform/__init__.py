"""Non-uniform codebooks: NF4, power-of-two and k-means."""

from .codebooks import kmeans_codebook, nearest_index, nf4_codebook, pow2_codebook

__all__ = ["kmeans_codebook", "nearest_index", "nf4_codebook", "pow2_codebook"]
