"""data2vec (v1) in JAX: one self-supervised recipe for speech, vision and text.

The encoders, masking, targets, EMA teacher and losses arrive with the data2vec
core; this package is reserved for them.
"""
