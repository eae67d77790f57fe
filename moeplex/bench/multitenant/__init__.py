"""`moeplex bench multitenant`: moeplex against static partitioning, one model, whole-model swapping and a transformers server."""
