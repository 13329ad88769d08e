"""`synthetic_edits`: procedurally generated instruction edits with exact ground-truth masks.

Each example is a flat-shaded scene (`scene`: background and one to four shapes), rendered without
antialiasing (`render`), and one edit in one of the seven CrispEdit categories with its instruction
(`edits`), so `edit_mask` equals `any(source != target)` exactly. The TFDS builder is in `builder`
(importing this package does not import TFDS).
"""

from editmgt_jax.data.synthetic_edits.edits import SYNTHETIC_VOCAB, generate_example

__all__ = ["SYNTHETIC_VOCAB", "generate_example"]
