"""IJB-B / IJB-C evaluation (python -m jaxface.ijb), as InsightFace's eval_ijbc.py.

meta.py reads the layout, aligner.py aligns the faces in worker processes, features.py
embeds them on the mesh and caches them, protocol.py turns embeddings into template
scores, metrics.py computes ROC / TAR@FAR and the 1:N numbers, report.py writes results.
Nothing here imports jax except features.py (and the command line that uses it).
"""
