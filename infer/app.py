"""A local web demo: upload an image, say what to change, get the edit.

  pip install -e ".[demo]" -c constraints.txt
  python -m infer.app                                  # the shipped default model, http://127.0.0.1:7860
  python -m infer.app --checkpoint hf:WeiChow/EditMGT  # the official release, converted once

The model is loaded once and warmed up (its edit program compiled) before the page opens. The page
takes an image, an instruction, an optional painted mask (only the painted part may change), the
sampler's steps, guidance, reference strength, hold threshold and seed (starting at the
checkpoint's own settings) and, when the editor supports it, a word query; it returns the edited
image, a before/after slider and the edit-region map over the source, all at the input's size, with
a progress bar over the sampling steps. Requests that arrive together are batched into one edit
call (``editmgt_jax.demo.EditQueue``; --max-batch-size).

It listens on 127.0.0.1 unless --host says otherwise; nothing is shared publicly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.app", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="model checkpoint folder or hf:ORG/NAME (default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max-batch-size", type=int, default=4, help="most requests per edit call (default 4)")
    p.add_argument("--batch-wait-ms", type=float, default=50.0,
                   help="how long a request waits for others to share its batch (default 50)")
    p.add_argument("--no-warm-up", action="store_true", help="skip the warm-up edit at start")
    return p


def build_app(edit_queue, *, title: str = "EditMGT"):
    """The gradio page over ``edit_queue`` (an ``editmgt_jax.demo.EditQueue``)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from editmgt_jax.demo import EditSettings, accepts_query_words

    editor = edit_queue.editor
    d = edit_queue.default_settings()
    with_query = accepts_query_words(editor)

    def run(image, instruction, mask, steps, guidance, strength, hold, seed, query, progress=gr.Progress()):
        from editmgt_jax.edit_inputs import EditError
        from editmgt_jax.imageio import ImageError

        settings = EditSettings(steps=int(steps), guidance_scale=float(guidance),
                                reference_strength=float(strength), hold_threshold=float(hold),
                                query_words=str(query or ""))
        try:
            ticket = edit_queue.submit(image, instruction, mask=mask, settings=settings, seed=int(seed or 0))
        except (EditError, ImageError) as e:
            raise gr.Error(str(e)) from None
        while not ticket.future.done():
            frac, words = ticket.status
            progress(frac, desc=words)
            time.sleep(0.1)
        try:
            out = ticket.future.result()
        except Exception as e:  # noqa: BLE001  (shown on the page, one line)
            raise gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        h, w = out.image.shape[:2]
        info = (f"{w}x{h}, {out.seconds:.1f} s" + (f", in a batch of {out.batch_size}" if out.batch_size > 1 else "")
                + "".join(f"\nnote: {n}" for n in out.notes))
        return out.image, out.before_after, out.region_overlay, info

    def mask_background(image):
        return None if image is None else {"background": image, "layers": [], "composite": image}

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}: edit an image with an instruction\n"
                    f"Model: `{editor.path}` (works at {editor.default_size} px; the result comes back at "
                    f"your image's size, unchanged outside the edited region).")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="numpy", image_mode="RGB", format="png", elem_id="image")
                instruction = gr.Textbox(label="Instruction", placeholder="paint the orange circle at the top cyan",
                                         elem_id="instruction")
                with gr.Accordion("Mask (optional): paint where the edit may happen", open=False):
                    mask = gr.ImageEditor(label="Mask", type="numpy", format="png", layers=False,
                                          transforms=(), elem_id="mask",
                                          brush=gr.Brush(colors=["#ff3366"], color_mode="fixed"))
                query = gr.Textbox(label="Word query (words of the instruction the edit-region map follows)",
                                   visible=with_query, elem_id="query")
                with gr.Accordion("Sampler (defaults: the checkpoint's)", open=True):
                    steps = gr.Slider(1, max(64, d.steps), value=d.steps, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(1.0, max(15.0, d.guidance_scale), value=d.guidance_scale, step=0.1,
                                         label="Guidance (1 = off)", elem_id="guidance")
                    strength = gr.Slider(0.5, max(2.0, d.reference_strength), value=d.reference_strength, step=0.05,
                                         label="Reference strength", elem_id="strength")
                    hold = gr.Slider(0.0, 1.0, value=d.hold_threshold, step=0.01,
                                     label="Hold threshold (0 = off)", elem_id="hold")
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                button = gr.Button("Edit", variant="primary", elem_id="edit")
            with gr.Column():
                edited = gr.Image(label="Edited", type="numpy", format="png", interactive=False, elem_id="edited")
                info = gr.Textbox(label="Result", interactive=False, elem_id="info")
                before_after = gr.ImageSlider(label="Before / after", type="numpy", elem_id="before-after")
                overlay = gr.Image(label="Edit-region map", type="numpy", interactive=False, elem_id="overlay")
        image.upload(mask_background, image, mask)
        button.click(run, [image, instruction, mask, steps, guidance, strength, hold, seed, query],
                     [edited, before_after, overlay, info], concurrency_limit=2 * edit_queue.max_batch_size)
    return app


def main(argv=None) -> int:
    from editmgt_jax import host_memory

    host_memory.keep()   # before jax starts: later edits reuse the first one's pages
    args = build_parser().parse_args(argv)
    if args.max_batch_size < 1:
        print(f"error: --max-batch-size {args.max_batch_size}: must be >= 1", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"error: --port {args.port}: must be 1-65535", file=sys.stderr)
        return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('error: the demo needs gradio: pip install -e ".[demo]" -c constraints.txt', file=sys.stderr)
        return 2
    from editmgt_jax import checkpoints
    from editmgt_jax.demo import EditQueue
    from editmgt_jax.editor import Editor

    try:
        editor = Editor.load(args.checkpoint)
    except checkpoints.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    edit_queue = EditQueue(editor, max_batch_size=args.max_batch_size, max_wait_s=args.batch_wait_ms / 1000)
    if not args.no_warm_up:
        print(f"warming up (one edit at {editor.default_size} px) ...", flush=True)
        print(f"warm-up took {edit_queue.warm_up():.1f} s", flush=True)
    app = build_app(edit_queue)
    app.queue(default_concurrency_limit=2 * args.max_batch_size)
    try:
        app.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, show_error=True)
    except OSError as e:
        print(f"error: --port {args.port}: {e}", file=sys.stderr)
        return 2
    finally:
        edit_queue.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
