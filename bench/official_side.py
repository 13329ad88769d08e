"""The PyTorch side of ``bench/vs_official.py``: runs under the official code's Python.

Not imported by the library. ``bench/vs_official.py`` starts it with ``--official-python`` and
``--official-src`` (a checkout of the official repository, put on ``sys.path``); nothing of the
official code is copied here, it is imported from that checkout.

    python bench/official_side.py layout SRC RELEASE SEED
        Write random weights for the configs already in RELEASE/{editmgt,vqvae,text_encoder,
        llm_encoder}/config.json (official classes, seeded), in the release layout.
    python bench/official_side.py serve SRC RELEASE THREADS
        Load the pipeline from RELEASE, then answer one JSON request per stdin line with one JSON line:
        {"op": "edit", ...settings} -> {"edit_s", "forward_s": [per transformer call]};
        {"op": "matmul", "n": 2048} -> {"gflops"}; {"op": "quit"}.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _import_official(src: str):
    sys.path.insert(0, os.path.abspath(src))
    try:
        import torchvision  # noqa: F401
    except ImportError:
        _install_torchvision_stub()
    from src.pipeline import Pipeline
    from src.scheduler import Scheduler
    from src.transformer import Transformer2DModel
    return Pipeline, Scheduler, Transformer2DModel


def _install_torchvision_stub() -> None:
    """The few ``torchvision.transforms`` the official pipeline calls on a reference image (resize
    of the short side, a crop, to-tensor), for a Python without torchvision."""
    import types

    import numpy as np
    import torch
    from PIL import Image

    class InterpolationMode:
        BILINEAR = Image.BILINEAR

    class Resize:
        def __init__(self, size, interpolation=Image.BILINEAR):
            self.size, self.interpolation = size, interpolation

        def __call__(self, img):
            w, h = img.size
            s = self.size / min(w, h)
            return img.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), self.interpolation)

    class RandomCrop:
        @staticmethod
        def get_params(img, output_size):
            w, h = img.size
            th, tw = output_size
            i = int(torch.randint(0, h - th + 1, (1,)))
            j = int(torch.randint(0, w - tw + 1, (1,)))
            return i, j, th, tw

    class ToTensor:
        def __call__(self, img):
            return torch.from_numpy(np.asarray(img.convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)

    class Normalize:
        def __init__(self, mean, std, inplace=False):
            self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

        def __call__(self, x):
            return (x - self.mean) / self.std

    functional = types.SimpleNamespace(crop=lambda img, top, left, h, w: img.crop((left, top, left + w, top + h)))
    transforms = types.SimpleNamespace(Resize=Resize, RandomCrop=RandomCrop, ToTensor=ToTensor, Normalize=Normalize,
                                       InterpolationMode=InterpolationMode, functional=functional)
    module = types.ModuleType("torchvision")
    module.transforms = transforms
    sys.modules["torchvision"] = module


def layout(src: str, release: str, seed: int) -> None:
    import torch
    from diffusers import VQModel
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPTextConfig, CLIPTextModelWithProjection

    _, Scheduler, Transformer2DModel = _import_official(src)
    torch.manual_seed(seed)

    def cfg(folder):
        with open(os.path.join(release, folder, "config.json")) as fh:
            return {k: v for k, v in json.load(fh).items() if not k.startswith("_")}

    Transformer2DModel(**cfg("editmgt")).save_pretrained(os.path.join(release, "editmgt"))
    VQModel(**cfg("vqvae")).save_pretrained(os.path.join(release, "vqvae"))
    CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder"))).save_pretrained(
        os.path.join(release, "text_encoder"))
    gemma_cfg = AutoConfig.from_pretrained(os.path.join(release, "llm_encoder"))
    AutoModelForCausalLM.from_config(gemma_cfg).save_pretrained(os.path.join(release, "llm_encoder"))
    Scheduler(mask_token_id=int(cfg("editmgt")["vocab_size"]) - 1).save_config(os.path.join(release, "scheduler"))


def serve(src: str, release: str, threads: int) -> None:
    import numpy as np
    import torch
    from diffusers import VQModel
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer

    torch.set_num_threads(threads)
    Pipeline, Scheduler, Transformer2DModel = _import_official(src)
    j = lambda *p: os.path.join(release, *p)  # noqa: E731
    pipe = Pipeline(transformer=Transformer2DModel.from_pretrained(j("editmgt")),
                    tokenizer=CLIPTokenizer.from_pretrained(j("tokenizer")),
                    text_encoder=CLIPTextModelWithProjection.from_pretrained(j("text_encoder")),
                    vqvae=VQModel.from_pretrained(j("vqvae")),
                    scheduler=Scheduler.from_pretrained(j("scheduler")),
                    text_encoder_t5=AutoModelForCausalLM.from_pretrained(j("llm_encoder"),
                                                                         output_hidden_states=True),
                    tokenizer_t5=AutoTokenizer.from_pretrained(j("llm_encoder"))).to("cpu")
    calls: list[float] = []
    forward = pipe.transformer.forward

    def timed_forward(*a, **k):
        t = time.perf_counter()
        out = forward(*a, **k)
        calls.append(time.perf_counter() - t)
        return out

    pipe.transformer.forward = timed_forward
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        if req["op"] == "matmul":
            n = int(req.get("n", 2048))
            a, b = torch.randn(n, n), torch.randn(n, n)
            torch.mm(a, b)
            best = min(_timed(lambda: torch.mm(a, b)) for _ in range(5))
            print(json.dumps({"gflops": 2 * n ** 3 / best / 1e9}), flush=True)
            continue
        size = int(req["size"])
        image = Image.fromarray(np.asarray(req["image"], np.uint8)) if "image" in req else \
            Image.new("RGB", (size, size), (120, 90, 60))
        pipe.attention_enable_blocks = req.get("blocks")
        pipe.local_guidance = float(req.get("hold_threshold", 0.0))
        calls.clear()
        with torch.no_grad():
            t = time.perf_counter()
            pipe(prompt=[req["instruction"]], height=size, width=size,
                 num_inference_steps=int(req["steps"]), guidance_scale=float(req["guidance_scale"]),
                 reference_strength=float(req["reference_strength"]), reference_image=[image],
                 negative_prompt=req.get("negative_prompt"), generator=torch.manual_seed(int(req.get("seed", 0))))
            edit_s = time.perf_counter() - t
        print(json.dumps({"edit_s": edit_s, "forward_s": calls}), flush=True)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    op = sys.argv[1]
    if op == "layout":
        layout(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif op == "serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(f"unknown op {op!r}")
