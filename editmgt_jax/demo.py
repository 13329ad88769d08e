"""What the web demo (``python -m infer.app``) runs, without the web page: an edit queue over one
loaded ``Editor`` that gathers concurrent requests into batches, one ``Editor.edit`` call each.

    queue = EditQueue(Editor.load(), max_batch_size=4)
    queue.warm_up()                         # compiles the default program before the first visitor
    out = queue.edit(image, "make the sky pink", settings=queue.default_settings(), seed=0)
    out.image, out.before_after, out.region_overlay

- Requests arriving while a batch runs (or within ``max_wait_s`` of the first) wait and run together
  as the next batch, up to ``max_batch_size``; requests whose settings differ (steps, guidance,
  strength, hold threshold, word query) or that differ in having a mask run as separate calls of
  that batch. Each request keeps its own seed (``Editor.edit(seed=[...])``): its result is the one it
  gets edited alone.
- Progress: each request can be asked where it is (``EditTicket.status``): queued, or the step of its
  batch's sampling loop (the loop's per-step host callback).
- Bad input (an empty instruction, an unreadable image, settings the model cannot take) fails that
  request alone with an ``EditError`` naming it; the rest of the batch is edited.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import queue as queue_lib
import re
import threading
import time
import warnings
from collections.abc import Mapping

import numpy as np

from editmgt_jax import composite, imageio
from editmgt_jax.edit_inputs import EditError


@dataclasses.dataclass(frozen=True)
class EditSettings:
    """The page's sliders (and word query): what one ``Editor.edit`` call shares."""

    steps: int
    guidance_scale: float
    reference_strength: float
    hold_threshold: float
    query_words: str = ""

    def overrides(self, editor) -> dict:
        """``Editor.edit`` keywords. The edit-region map needs consolidation blocks: the checkpoint's,
        else the last quarter of the model's blocks (``consolidation_blocks``)."""
        out = dict(steps=int(self.steps), guidance_scale=float(self.guidance_scale),
                   reference_strength=float(self.reference_strength), hold_threshold=float(self.hold_threshold),
                   consolidation_blocks=consolidation_blocks(editor))
        if self.query_words.strip() and accepts_query_words(editor):
            out["query_words"] = self.query_words.strip()
        return out


def consolidation_blocks(editor) -> tuple[int, ...]:
    """The checkpoint's consolidation blocks, else the last quarter of its transformer's blocks."""
    blocks = tuple(editor.sampler_config().consolidation_blocks)
    if blocks:
        return blocks
    n = int(editor.tr_cfg.num_blocks)
    return tuple(range(n - max(1, n // 4), n))


def accepts_query_words(editor) -> bool:
    """Whether this ``Editor.edit`` takes a word query (``query_words=``)."""
    return "query_words" in inspect.signature(editor.edit).parameters


@dataclasses.dataclass
class EditOutput:
    """One request's result, every image at the input's own size."""

    image: np.ndarray                      # [H, W, 3] uint8 the edited image
    source: np.ndarray                     # [H, W, 3] uint8 the input as read
    region_overlay: np.ndarray             # [H, W, 3] uint8 the edit-region map over the source
    batch_size: int                        # how many requests shared its Editor.edit call
    seconds: float                         # wall time of its batch
    notes: list = dataclasses.field(default_factory=list)   # what the model read only in part (InstructionWarning)

    @property
    def before_after(self) -> tuple[np.ndarray, np.ndarray]:
        return self.source, self.image


@dataclasses.dataclass
class EditTicket:
    """A submitted request: its future and where it is."""

    image: np.ndarray
    instruction: str
    mask: np.ndarray | None
    settings: EditSettings
    seed: int
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    state: str = "queued"
    step: int = 0
    steps: int = 0

    @property
    def status(self) -> tuple[float, str]:
        """``(fraction done, words)`` for a progress bar."""
        if self.state == "queued":
            return 0.0, "queued"
        if self.state == "editing" and self.steps:
            return min(self.step, self.steps) / self.steps, f"step {min(self.step, self.steps)} of {self.steps}"
        return (1.0, "done") if self.state == "done" else (0.0, self.state)


class _BatchProgress:
    """``Editor.progress`` while the queue runs: the sampling loop's per-step callback, forwarded to
    the tickets of the running call."""

    def __init__(self):
        self.tickets: list[EditTicket] = []

    def start(self, steps: int, desc: str = "sampling") -> None:
        for t in self.tickets:
            t.steps, t.step = steps, 0

    def __call__(self, *_operands) -> None:
        for t in self.tickets:
            t.step += 1

    def finish(self) -> None:
        for t in self.tickets:
            t.step = t.steps


def mask_from_layers(value, shape: tuple[int, int]) -> np.ndarray | None:
    """A painted mask from an image editor's value: ``{"layers": [RGBA arrays], ...}`` (gradio's
    ``ImageEditor``), a plain ``[H, W]`` / ``[H, W, C]`` array, or None. Painted pixels (alpha > 0,
    or non-zero) may change; returns ``[H, W]`` bool at ``shape`` (nearest resize), or None when
    nothing is painted."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        layers = [np.asarray(l) for l in (value.get("layers") or []) if l is not None]
        if not layers:
            return None
        painted = np.zeros(layers[0].shape[:2], bool)
        for l in layers:
            a = l[..., 3] if l.ndim == 3 and l.shape[-1] == 4 else (l.max(axis=-1) if l.ndim == 3 else l)
            if a.shape != painted.shape:
                a = _nearest(a, painted.shape)
            painted |= a > 0
    else:
        arr = np.asarray(value)
        painted = (arr.max(axis=-1) if arr.ndim == 3 else arr) > 0
    if not painted.any():
        return None
    return painted if painted.shape == tuple(shape) else _nearest(painted, shape)


def _nearest(a: np.ndarray, shape) -> np.ndarray:
    h, w = shape
    ys = np.minimum((np.arange(h) * a.shape[0]) // h, a.shape[0] - 1)
    xs = np.minimum((np.arange(w) * a.shape[1]) // w, a.shape[1] - 1)
    return a[ys][:, xs]


class EditQueue:
    """Concurrent edit requests over one ``Editor``, batched (see the module doc).

    ``max_batch_size``: most requests per batch; ``max_wait_s``: how long the first request of an
    idle queue waits for company before its batch starts.
    """

    def __init__(self, editor, *, max_batch_size: int = 4, max_wait_s: float = 0.05):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: must be >= 1")
        self.editor = editor
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_s)
        self.batches: list[int] = []      # the size of every batch run, in order
        self.calls = 0                    # Editor.edit calls made
        self._queue: queue_lib.Queue = queue_lib.Queue()
        self._progress = _BatchProgress()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="edit-queue", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ settings
    def default_settings(self) -> EditSettings:
        """The checkpoint's recommended settings (its conventions): the sliders' starting values."""
        d = self.editor.sampler_config()
        return EditSettings(steps=d.steps, guidance_scale=float(d.guidance_scale),
                            reference_strength=float(d.reference_strength), hold_threshold=float(d.hold_threshold))

    # ------------------------------------------------------------------ requests
    def submit(self, image, instruction: str, *, mask=None, settings: EditSettings | None = None,
               seed: int = 0) -> EditTicket:
        """Queue one edit; returns at once. The image is read here (``EditError`` / ``ImageError``
        naming it when it cannot be)."""
        if self._closed:
            raise RuntimeError("the edit queue is closed")
        if image is None:
            raise EditError("no image: upload one")
        if not isinstance(instruction, str) or not instruction.strip():
            raise EditError("empty instruction: say what to change")
        arr = self.editor.load_rgb(image, name="image")
        ticket = self._ticket(arr, instruction.strip(), mask, settings or self.default_settings(), int(seed))
        self._queue.put(ticket)
        return ticket

    def _ticket(self, image: np.ndarray, instruction: str, mask, settings: EditSettings, seed: int) -> EditTicket:
        m = mask_from_layers(mask, image.shape[:2]) if mask is not None else None
        return EditTicket(image, instruction, m, settings, seed)

    def edit(self, image, instruction: str, **kwargs) -> EditOutput:
        """``submit`` and wait for the result (its error re-raised)."""
        return self.submit(image, instruction, **kwargs).future.result()

    def warm_up(self, settings: EditSettings | None = None) -> float:
        """Run one edit at the working size so the first visitor does not wait for the compile;
        returns its seconds."""
        t = time.monotonic()
        s = self.editor.default_size
        self.edit(np.full((s, s, 3), 127, np.uint8), "warm up", settings=settings)
        return time.monotonic() - t

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=60)

    # ------------------------------------------------------------------ the worker
    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue_lib.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            self.run_batch(batch)

    def run_batch(self, tickets: list[EditTicket]) -> None:
        """Edit ``tickets``: one ``Editor.edit`` call per group of equal settings and mask presence;
        every ticket's future gets its ``EditOutput`` or its error."""
        self.batches.append(len(tickets))
        groups: dict[tuple, list[EditTicket]] = {}
        for t in tickets:
            groups.setdefault((t.settings, t.mask is not None), []).append(t)
        for (settings, has_mask), group in groups.items():
            self._run_group(settings, has_mask, group, len(tickets))

    def _run_group(self, settings: EditSettings, has_mask: bool, group: list[EditTicket], batch_size: int) -> None:
        t0 = time.monotonic()
        try:
            over = settings.overrides(self.editor)
            self.editor.sampler_config(**{k: v for k, v in over.items() if k != "query_words"})
        except (EditError, ValueError) as e:
            for t in group:
                t.state = "failed"
                t.future.set_exception(EditError(str(e)))
            return
        for t in group:
            t.state = "editing"
        previous = self.editor.progress
        self._progress.tickets = group
        self.editor.progress = self._progress
        notes: dict[int, list[str]] = {}
        try:
            self.calls += 1
            with warnings.catch_warnings(record=True) as caught:   # only this thread edits
                warnings.simplefilter("always")
                res = self.editor.edit([t.image for t in group], [t.instruction for t in group],
                                       masks=[t.mask for t in group] if has_mask else None,
                                       seed=[t.seed for t in group], progress=True, **over)
            for w in caught:
                m = re.match(r"instruction (\d+): (.*)", str(w.message), re.S)
                if m:
                    notes.setdefault(int(m.group(1)), []).append(m.group(2))
        except Exception as e:  # noqa: BLE001  (the request fails, the queue goes on)
            for t in group:
                t.state = "failed"
                t.future.set_exception(e)
            return
        finally:
            self.editor.progress = previous
            self._progress.tickets = []
        seconds = time.monotonic() - t0
        for i, t in enumerate(group):
            t.state = "done"
            t.future.set_result(EditOutput(image=res.images[i], source=res.originals[i],
                                           region_overlay=region_overlay(res, i), batch_size=batch_size,
                                           seconds=seconds, notes=notes.get(i, [])))


def region_overlay(result, i: int) -> np.ndarray:
    """Edit ``i``'s edit-region map over its source at the input's size: the consolidated map when
    the edit captured one, else the region its output was blended through."""
    if result.heatmaps is not None:
        score = composite.grid_to_input(result.heatmaps[i], result.placements[i])
    elif result.region_maps is not None:
        score = result.region_maps[i]
    else:
        score = np.zeros(result.originals[i].shape[:2], np.float32)
    return imageio.heatmap_overlay(result.originals[i], score)
