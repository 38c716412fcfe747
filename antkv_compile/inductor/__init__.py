"""Inductor lowerings of the antkv ops, one file per op family (attention.py: antkv::attention on CUDA).

Imported by the backend right before it calls Inductor, not at `import antkv_compile`."""
