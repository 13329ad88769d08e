"""Files shipped inside the package (installed with it, editable or not).

``DEFAULT_MODEL`` is the model ``Editor.load()`` and ``infer.edit`` use when no checkpoint is given:
a model checkpoint folder (``editmgt_jax.checkpoints`` layout). Replacing the default model means
replacing the files of that folder; nothing else names it.
"""

import os

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "editmgt-synthetic-64")
