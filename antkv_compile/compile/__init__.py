"""The torch.compile side: the backend (antkv_backend, explain, mark_growing), patch(), and the graph passes (one file per cache pattern)."""
