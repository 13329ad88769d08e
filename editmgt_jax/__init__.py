"""EditMGT in JAX / Flax NNX: masked-generative-transformer image editing with region hold."""

__version__ = "0.1.0"
