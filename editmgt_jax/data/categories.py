"""The seven edit categories shared by every edit dataset (CrispEdit-2M's `type` column).

Both `crispedit` and `synthetic_edits` label examples with an index into `EDIT_CATEGORIES`, so models
and metrics treat the two datasets alike.
"""

# In the order of the datasets' ClassLabel ids.
EDIT_CATEGORIES: tuple[str, ...] = (
    "add",
    "background change",
    "color",
    "motion change",
    "remove",
    "replace",
    "style",
)
