"""Training and adapting NetVLAD models (pnv train, pnv add-pca)."""
