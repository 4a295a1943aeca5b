"""What the demo page asks of a model, without HTTP: validated requests, sampling with progress, scoring
by exact likelihood. The server (``farmer.demo.server``) only routes bytes to these methods.
"""

from __future__ import annotations

import base64
import io
import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from farmer.data import make_dataset
from farmer.demo.card import NO_REFERENCE, Limits, available_inverses, checkpoint_reference, model_card
from farmer.images import ImageTooLarge, load_image, make_grid, samples_bytes
from farmer.metrics import bits_per_dim
from farmer.model import Farmer
from farmer.pixels import dequantize, model_to_pixels
from farmer.pretrained import read_config, read_id2label
from farmer.sampling import DEFAULT_SAMPLING, SamplingOptions, batch_generator, make_guidance, parse_classes

CFG_METHODS = ("resampling", "naive", "none")
SAMPLE_FIELDS = ("classes", "count", "guidance", "cfg", "variance_scale", "temperature", "inverse", "seed")
KEPT_RESULTS = 8  # finished grids kept for download; older ones are dropped


class ApiError(Exception):
    """A request the demo refuses, with the HTTP status and a message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class SampleRequest:
    """One grid: ``count`` images per class in ``classes`` (CLI syntax, e.g. "0-9"; "" = the null class,
    then ``count`` is the total)."""

    classes: str
    count: int = 4
    guidance: float = 2.5
    cfg: str = "resampling"
    variance_scale: float = 1.0
    temperature: float = 1.0
    inverse: str = DEFAULT_SAMPLING.inverse  # the library's default, as `farmer sample` uses
    seed: int = 0


def _number(data: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be in [{lo:g}, {hi:g}], got {value:g}")
    return float(value)


def _integer(data: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _choice(data: dict[str, Any], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = data.get(name, default)
    if value not in choices:
        raise ApiError(400, f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def parse_sample_request(data: Any, model: Farmer, limits: Limits,
                         names: list[str] | None = None) -> tuple[SampleRequest, list[int]]:
    """A JSON object from the page -> (request, class list), or ApiError(400) naming the bad field. ``names``:
    the model's class names, which "classes" may use. No classes means unconditional sampling, so the request
    then comes back with cfg "none" whatever it asked for: guidance contrasts a class with the null class."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(data) - set(SAMPLE_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; expected some of {', '.join(SAMPLE_FIELDS)}")
    cfg = model.config
    text = data.get("classes", f"0-{cfg.num_classes - 1}" if cfg.conditional else "")
    if not isinstance(text, str):
        raise ApiError(400, f"classes must be a string like 0-9, got {text!r}")
    if text.strip() and not cfg.conditional:
        raise ApiError(400, "this model is unconditional: leave classes empty")
    try:
        classes = parse_classes(text, cfg.num_classes, names) if text.strip() else []
    except ValueError as err:
        raise ApiError(400, str(err).replace("--classes", "classes")) from None
    method = _choice(data, "cfg", SampleRequest.cfg, CFG_METHODS)
    request = SampleRequest(
        classes=text,
        count=_integer(data, "count", SampleRequest.count, 1, limits.max_images),
        guidance=_number(data, "guidance", SampleRequest.guidance, 0.0, limits.max_guidance),
        cfg=method if classes else "none",
        variance_scale=_number(data, "variance_scale", SampleRequest.variance_scale, 1e-3, limits.max_scale),
        temperature=_number(data, "temperature", SampleRequest.temperature, 1e-3, limits.max_scale),
        inverse=_choice(data, "inverse", SampleRequest.inverse, available_inverses(model)),
        seed=_integer(data, "seed", SampleRequest.seed, 0, 2**63 - 1),
    )
    total = request.count * max(1, len(classes))
    if total > limits.max_images:
        raise ApiError(400, f"{total} images requested ({len(classes)} classes × {request.count}); "
                            f"the limit is {limits.max_images}")
    return request, classes


def sampling_options(request: SampleRequest) -> SamplingOptions:
    guidance = None if request.cfg == "none" else make_guidance(request.cfg, request.guidance)
    return SamplingOptions(guidance=guidance, variance_scale=request.variance_scale, temperature=request.temperature,
                           inverse=request.inverse, seed=request.seed)


def grid_scale(image_size: int) -> int:
    """Small images are upscaled (nearest) so that a downloaded grid is legible: 8 px -> 4×, 28 px -> 2×."""
    return max(1, min(4, 56 // image_size))


def png_bytes(array: np.ndarray, scale: int = 1) -> bytes:
    """uint8 (H, W, C) with C = 1 or 3 -> PNG."""
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Progress:
    """The running job as the page's progress bar sees it; written by the job's thread only."""

    job: str = ""
    done: int = 0
    total: int = 0


class DemoApp:
    """One model, one job at a time (sampling or scoring), the last few grids kept for download."""

    def __init__(self, model: Farmer, checkpoint: Path, limits: Limits | None = None) -> None:
        self.model = model.eval()
        self.checkpoint = checkpoint
        self.limits = limits or Limits()
        self.card = model_card(model, checkpoint, self.limits)
        self.reference = checkpoint_reference(checkpoint)
        self.class_names = read_id2label(checkpoint)
        self._busy = threading.Lock()
        self._progress = Progress()
        self._results: OrderedDict[int, dict[str, bytes]] = OrderedDict()
        self._results_lock = threading.Lock()
        self._next_id = 1
        self._test_set: Dataset | None = None

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "cpu", limits: Limits | None = None) -> DemoApp:
        return cls(Farmer.from_pretrained(checkpoint, map_location=device), Path(checkpoint), limits)

    # One job at a time --------------------------------------------------------------------------------
    @contextmanager
    def exclusive(self, job: str, total: int = 0) -> Iterator[Progress]:
        """Run ``job`` alone, or refuse with 429: queueing would hold a browser request open for minutes."""
        if not self._busy.acquire(blocking=False):
            running = self._progress
            raise ApiError(429, f"busy: {running.job} is running ({running.done}/{running.total}); "
                                "try again when it finishes")
        self._progress = Progress(job, 0, total)
        try:
            yield self._progress
        finally:
            self._progress = Progress()
            self._busy.release()

    def status(self) -> dict[str, Any]:
        progress = self._progress
        return {"busy": self._busy.locked(), "job": progress.job, "done": progress.done, "total": progress.total}

    # Sampling -----------------------------------------------------------------------------------------
    def sample(self, data: Any) -> dict[str, Any]:
        """Draw the requested grid; returns its layout and the URLs of its PNG and .npz."""
        request, classes = parse_sample_request(data, self.model, self.limits, self.class_names)
        if classes:
            labels: Tensor | None = torch.tensor(classes).repeat_interleave(request.count)
            cols = request.count
        else:
            labels, cols = None, math.ceil(math.sqrt(request.count))
        n = request.count * max(1, len(classes))
        with self.exclusive("sampling", total=self.model.config.num_tokens) as progress:

            def advance(tokens: int) -> None:
                progress.done += tokens

            start = time.perf_counter()
            # One batch with `farmer sample`'s first-batch generator: the same seed gives the same images there.
            options = sampling_options(request)
            images = options.sample(self.model, n, None if labels is None else labels.to(self.model.device),
                                    batch_generator(options.seed, 0, self.model.device), progress=advance)
            seconds = time.perf_counter() - start
        pixels = model_to_pixels(images).cpu()
        scale = grid_scale(self.model.config.image_size)
        grid = make_grid(pixels, nrow=cols)
        result_id = self._store({"png": png_bytes(grid, scale), "npz": samples_bytes(pixels, labels)})
        return {"id": result_id, "tiles": n, "rows": math.ceil(n / cols), "cols": cols,
                "width": grid.shape[1] * scale, "height": grid.shape[0] * scale, "seconds": round(seconds, 3),
                "png": f"/api/result/{result_id}.png", "npz": f"/api/result/{result_id}.npz",
                "labels": [] if labels is None else labels.tolist(), "cfg": request.cfg}

    def _store(self, files: dict[str, bytes]) -> int:
        with self._results_lock:
            result_id = self._next_id
            self._next_id += 1
            self._results[result_id] = files
            while len(self._results) > KEPT_RESULTS:
                self._results.popitem(last=False)
        return result_id

    def result(self, result_id: int, kind: str) -> bytes:
        with self._results_lock:
            files = self._results.get(result_id)
        if files is None or kind not in files:
            raise ApiError(404, f"no result {result_id}.{kind}: only the last {KEPT_RESULTS} grids are kept")
        return files[kind]

    # Scoring ------------------------------------------------------------------------------------------
    def decode_upload(self, body: bytes, invert: bool) -> Tensor:
        """Image file bytes -> uint8 (1, C, H, W) at the model's size: centre square crop, bicubic resize
        (as the image-folder data set does), optionally inverted for dark-on-light drawings."""
        cfg = self.model.config
        if not body:
            raise ApiError(400, "no image in the request body")
        try:
            # A dark drawing on a transparent background is composited onto white before the inversion.
            pixels = load_image(io.BytesIO(body), cfg.channels, cfg.image_size, self.limits.max_upload_pixels,
                                background=255 if invert else None)[None]
        except (ImageTooLarge, Image.DecompressionBombError) as err:
            raise ApiError(413, str(err)) from None
        except OSError:  # not an image, or a truncated one
            raise ApiError(400, "the upload is not an image file Pillow can read (PNG, JPEG, GIF, BMP, ...)") from None
        return 255 - pixels if invert else pixels

    def test_image(self, index: int | None) -> tuple[Tensor, int, int]:
        """(image, label, index) of the test split of the data the checkpoint was trained on; a random
        image when ``index`` is None."""
        if self._test_set is None:
            train = read_config(self.checkpoint).get("train", {})
            if "data" not in train:
                raise ApiError(404, "the checkpoint does not record its training data; upload an image instead")
            try:
                self._test_set = make_dataset(train["data"], "test", train.get("data_root"),
                                              self.model.config.image_size)
            except (FileNotFoundError, ValueError) as err:
                raise ApiError(404, f"test images unavailable: {err}") from None
        count = len(self._test_set)
        index = random.randrange(count) if index is None else index
        if not 0 <= index < count:
            raise ApiError(400, f"test_index must be in [0, {count - 1}], got {index}")
        pixels, label = self._test_set[index]
        return pixels[None], int(label), index

    @torch.no_grad()
    def score(self, pixels: Tensor) -> dict[str, Any]:
        """Bits/dim of one uint8 image (1, C, H, W), unconditional and under every class, and the class
        posterior p(y | x) ∝ p(x | y) under a uniform class prior: the exact likelihood as a classifier."""
        cfg = self.model.config
        # Uniform dequantisation (as for test bits/dim) with a fixed seed: the same image always scores the
        # same, and every class sees the same noise, so the class comparison is exact.
        x = dequantize(pixels, "uniform", generator=torch.Generator().manual_seed(0)).to(self.model.device)
        with self.exclusive("scoring"):
            unconditional = self.model.log_prob(x)
            conditional = None
            if cfg.conditional:
                classes = torch.arange(cfg.num_classes, device=x.device)
                conditional = self.model.log_prob(x.expand(cfg.num_classes, -1, -1, -1), classes)
        bpd_unconditional = bits_per_dim(-unconditional, cfg.num_dims).item()
        result: dict[str, Any] = {
            "bpd_unconditional": bpd_unconditional,
            "reference": self.reference.describe() if self.reference else NO_REFERENCE,
            "verdict": self.reference.compare(bpd_unconditional) if self.reference else "",
            "image": "data:image/png;base64," + base64.b64encode(
                png_bytes(pixels[0].permute(1, 2, 0).numpy())).decode(),
        }
        if conditional is not None:
            bpd = bits_per_dim(-conditional, cfg.num_dims)
            best = int(conditional.argmax())
            result.update(bpd_by_class=bpd.tolist(), posterior=torch.softmax(conditional, 0).tolist(),
                          best_class=best, bpd_conditional=bpd[best].item(),
                          best_class_name=self.class_names[best] if self.class_names else str(best))
        return result
