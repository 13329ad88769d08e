"""EditMGT in JAX / Flax NNX: masked-generative-transformer image editing with region hold."""

from flax import nnx as _nnx

# Parameters carry logical axis names; shardings are applied at the jit boundary
# (see editmgt_jax.parallel), never eagerly at construction.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
