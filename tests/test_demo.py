"""`farmer demo`: the JSON API over HTTP (tiny model) and the page in a real headless chromium (shipped model)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import random_model, small_config
from PIL import Image

from farmer.checkpoint import save_checkpoint
from farmer.cli import build_parser, main, shipped_checkpoint
from farmer.data import make_dataset
from farmer.demo import DemoApp, Limits, make_server
from farmer.demo.card import ScoreReference, _checkpoint_name, _training
from farmer.demo.server import DemoServer, json_depth
from farmer.metrics import bits_per_dim
from farmer.pixels import dequantize
from farmer.pretrained import SHIPPED_DIR
from farmer.sampling import parse_classes

LIMITS = Limits(max_images=12, max_upload_bytes=4096, max_upload_pixels=64 * 64, socket_timeout_s=0.5)
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _serve(app: DemoApp) -> Iterator[DemoServer]:
    server = make_server(app, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomised tiny model (8×8 digits, 10 classes) saved as a checkpoint with a metrics.json."""
    config = small_config()
    directory = save_checkpoint(tmp_path_factory.mktemp("demo"), 5, {
        "model": config.to_dict(), "train": {"data": "digits", "batch_size": 8},
        "id2label": {str(index): name for index, name in enumerate(NAMES)}}, random_model(config).state_dict())
    (directory / "metrics.json").write_text(json.dumps({"test_bits_per_dim": 3.5, "evaluations": {
        "classifier-cfg": {"classifier_score": 2.0, "frechet_distance": 10.0, "accuracy": 0.5, "num_images": 100},
        "broken": {"fid": "not a number"}}}))
    return directory


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[DemoServer]:
    yield from _serve(DemoApp.load(tiny_checkpoint, limits=LIMITS))


def request(server: DemoServer, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def api(server: DemoServer, method: str, path: str, payload: Any = None, **kwargs: Any) -> tuple[int, Any]:
    """A request as the page sends it: JSON, or an upload typed application/octet-stream."""
    body = json.dumps(payload).encode() if payload is not None else kwargs.pop("body", None)
    if method == "POST":
        upload = path.startswith("/api/score") and "test_index" not in path
        kwargs["headers"] = {"Content-Type": "application/octet-stream" if upload else "application/json",
                             **kwargs.get("headers", {})}
    status, headers, data = request(server, method, path, body, **kwargs)
    assert headers["Content-Type"] == "application/json", (status, data[:200])
    return status, json.loads(data)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# The JSON API ----------------------------------------------------------------------------------------------
def test_page_and_model_card(server: DemoServer) -> None:
    status, headers, page = request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'id="sample-form"' in page
    status, card = api(server, "GET", "/api/card")
    rows = dict(card["rows"])
    assert status == 200 and rows["preset"] == "tiny" and rows["training data"] == "digits"
    assert rows["training"] == "5 steps of batch 8" and rows["test bits/dim"] == "3.500"
    assert rows["typical bits/dim"] == "test images average 3.50 bits/dim"
    assert rows["classes"].startswith("10, class-conditional: 0 zero, 1 one") and card["class_names"] == NAMES
    assert rows["classifier-cfg"].startswith("classifier score 2.00") and "broken" not in rows  # bad entry left out
    assert "exact" in card["inverses"] and "distilled" not in card["inverses"]  # the tiny model has no student
    assert card["limits"]["max_images"] == 12


def test_model_card_counts_the_steps_behind_a_fine_tune_or_a_teacher() -> None:
    trained = {"step": 4000, "train": {"batch_size": 64}, "pretrained_steps": 4100}
    assert _training(trained, {}) == ("8,100 steps in all: 4,000 of batch 64, after 4,100 in the runs it started "
                                      "from (--init-from)")
    distilled = {"step": 300, "train": {"objective": "distill", "batch_size": 64}, "pretrained_steps": 8100}
    provenance = {"teacher": {"step": 4000, "train": {"batch_size": 64}}}
    assert _training(distilled, provenance) == "8,100 steps of batch 64; inverse distilled for 300 steps"
    # Checkpoints from before pretrained_steps was recorded: the teacher's own steps, as before.
    assert _training({**distilled, "pretrained_steps": None}, provenance).startswith("4,000 steps of batch 64;")


def test_sample_grid_png_and_npz(server: DemoServer) -> None:
    payload = {"classes": "1,3", "count": 2, "guidance": 1.5, "cfg": "naive", "seed": 7}
    status, result = api(server, "POST", "/api/sample", payload)
    assert status == 200 and (result["tiles"], result["rows"], result["cols"]) == (4, 2, 2)
    grid = Image.open(io.BytesIO(request(server, "GET", result["png"])[2]))
    # 8-pixel tiles with 2-pixel gaps, upscaled 4×.
    assert grid.size == (result["width"], result["height"]) == ((2 * 10 + 2) * 4, (2 * 10 + 2) * 4)
    with np.load(io.BytesIO(request(server, "GET", result["npz"])[2])) as data:
        assert data["arr_0"].shape == (4, 8, 8, 1) and data["arr_0"].dtype == np.uint8
        assert data["labels"].tolist() == [1, 1, 3, 3]
        first = data["arr_0"]
    _, again = api(server, "POST", "/api/sample", payload)
    with np.load(io.BytesIO(request(server, "GET", again["npz"])[2])) as data:
        assert np.array_equal(data["arr_0"], first)  # same seed, same images
    status, unconditional = api(server, "POST", "/api/sample", {"classes": "", "count": 5, "cfg": "none"})
    assert status == 200 and (unconditional["tiles"], unconditional["rows"], unconditional["cols"]) == (5, 2, 3)
    assert unconditional["labels"] == []


def test_same_images_as_farmer_sample(server: DemoServer, tiny_checkpoint: Path, tmp_path) -> None:
    _, result = api(server, "POST", "/api/sample", {"classes": "2-4", "count": 2, "guidance": 2.0, "seed": 3})
    npz = tmp_path / "cli.npz"
    assert main(["sample", "--checkpoint", str(tiny_checkpoint), "--classes", "2-4", "--n", "6", "--guidance", "2",
                 "--seed", "3", "--out", str(tmp_path / "cli.png"), "--npz", str(npz)]) == 0
    with np.load(io.BytesIO(request(server, "GET", result["npz"])[2])) as demo, np.load(npz) as cli:
        assert np.array_equal(demo["arr_0"], cli["arr_0"]) and np.array_equal(demo["labels"], cli["labels"])


def test_progress_counts_every_token_while_busy(server: DemoServer, monkeypatch) -> None:
    app, seen = server.app, []
    decode = app.model.decode

    def watched_decode(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(app.status())
        return decode(*args, **kwargs)

    monkeypatch.setattr(app.model, "decode", watched_decode)
    assert api(server, "POST", "/api/sample", {"classes": "0", "count": 1})[0] == 200
    tokens = app.model.config.num_tokens
    assert seen == [{"busy": True, "job": "sampling", "done": tokens, "total": tokens}]
    assert api(server, "GET", "/api/status") == (200, {"busy": False, "job": "", "done": 0, "total": 0})


def test_one_job_at_a_time_others_get_429(server: DemoServer) -> None:
    with server.app.exclusive("sampling", total=16):
        status, body = api(server, "POST", "/api/sample", {"classes": "0", "count": 1})
        assert status == 429 and body["error"].startswith("busy: sampling is running (0/16)")
        assert api(server, "POST", "/api/score", body=png(np.zeros((8, 8), np.uint8)))[0] == 429
        assert api(server, "GET", "/api/status")[1]["busy"] is True
    assert api(server, "POST", "/api/sample", {"classes": "0", "count": 1})[0] == 200


@pytest.mark.parametrize(("payload", "message"), [
    ({"count": 0}, "count must be in [1, 12]"),
    ({"classes": "0", "count": 13}, "count must be in [1, 12]"),
    ({"classes": "0-9", "count": 2}, "20 images requested"),
    ({"classes": "12"}, "out of range"),
    ({"classes": "0-99999999999"}, "'0-99999999999' is out of range for a model with 10 classes (0-9)"),
    ({"classes": "zero,ten"}, "or class names (zero, one,"),
    ({"classes": "a-b"}, "classes must look like 0-9"),
    ({"classes": [1, 2]}, "classes must be a string"),
    ({"guidance": -1}, "guidance must be in [0, 20]"),
    ({"guidance": "2"}, "guidance must be a number"),
    ({"cfg": "magic"}, "cfg must be one of resampling, naive, none"),
    ({"inverse": "distilled"}, "inverse must be one of"),
    ({"variance_scale": 0}, "variance_scale must be in"),
    ({"seed": True}, "seed must be an integer"),
    ({"colour": "red"}, "unknown field(s) colour"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_sample_requests_get_400_with_a_message(server: DemoServer, payload: Any, message: str) -> None:
    status, body = api(server, "POST", "/api/sample", payload)
    assert status == 400 and message in body["error"]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "message"), [
    ("GET", "/nowhere", None, {}, 404, "no such page"),
    ("GET", "/api/sample", None, {}, 405, "takes POST"),
    ("PUT", "/", b"", {}, 501, "Unsupported method"),
    ("GET", "/api/result/999.png", None, {}, 404, "no result 999.png"),
    ("POST", "/api/sample", b"{not json", {}, 400, "not valid JSON"),
    ("POST", "/api/sample", 70_000, {}, 413, "the limit is 65,536"),
    ("POST", "/api/score", 5000, {}, 413, "the limit is 4,096"),
    ("POST", "/api/score", b"GIF89a not really", {}, 400, "not an image file"),
    ("POST", "/api/score", b"", {}, 400, "no image"),
    ("POST", "/api/score?test_index=x", b"", {}, 400, "test_index must be an integer"),
    ("POST", "/api/score?test_index=100000", b"", {}, 400, "test_index must be in [0, "),
    ("POST", "/api/score", None, {"Transfer-Encoding": "chunked"}, 411, "Content-Length"),
])
def test_http_errors_are_json_with_a_message(server: DemoServer, method: str, path: str,
                                             body: bytes | int | None, headers: dict[str, str], status: int,
                                             message: str) -> None:
    if isinstance(body, int):  # an oversized body of this many bytes
        body = b"x" * body
    got, data = api(server, method, path, body=body, headers=headers)
    assert got == status and message in data["error"]


def test_malformed_request_line_gets_json_not_html(server: DemoServer) -> None:
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(b"GET /a b HTTP/1.0\r\n\r\n")  # a space in the path: http.server's own 400
        reply = sock.makefile("rb").read().decode()
    assert reply.startswith("HTTP/1.0 400") and '{"error": "Bad request syntax' in reply and "<html" not in reply


def test_upload_is_bounded_in_pixels(server: DemoServer) -> None:
    status, body = api(server, "POST", "/api/score", body=png(np.zeros((65, 64), np.uint8)))
    assert status == 413 and "limit is 4096 pixels" in body["error"]


def test_score_upload_equals_exact_log_prob(server: DemoServer) -> None:
    pixels, label = make_dataset("digits", "test", None, 8)[3]
    status, upload = api(server, "POST", "/api/score", body=png(pixels[0].numpy()))
    model = server.app.model
    x = dequantize(pixels[None], "uniform", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = bits_per_dim(-model.log_prob(x.expand(10, -1, -1, -1), torch.arange(10)), 64)
        unconditional = bits_per_dim(-model.log_prob(x), 64).item()
    assert status == 200 and upload["bpd_by_class"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert upload["bpd_unconditional"] == pytest.approx(unconditional, abs=1e-5)
    assert upload["best_class"] == int(expected.argmin()) and sum(upload["posterior"]) == pytest.approx(1.0)
    # The same image picked from the test set scores the same, and comes with its label.
    _, picked = api(server, "POST", "/api/score?test_index=3", body=b"")
    assert picked["label"] == label and picked["bpd_by_class"] == upload["bpd_by_class"]
    _, inverted = api(server, "POST", "/api/score?invert=1", body=png(255 - pixels[0].numpy()))
    assert inverted["bpd_by_class"] == upload["bpd_by_class"]
    # A larger colour upload is centre-cropped and resized to the model's 8×8.
    rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    status, resized = api(server, "POST", "/api/score", body=png(rgb))
    assert status == 200 and Image.open(io.BytesIO(_data_url_bytes(resized["image"]))).size == (8, 8)
    _, random_pick = api(server, "POST", "/api/score?test_index=random", body=b"")
    assert 0 <= random_pick["test_index"] < len(make_dataset("digits", "test", None, 8))


def _data_url_bytes(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


def test_cli_defaults_to_loopback_and_reports_a_taken_port(server: DemoServer) -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.checkpoint) == ("127.0.0.1", 7860, None)
    with pytest.raises(RuntimeError, match=r"cannot listen on 127\.0\.0\.1"):
        make_server(server.app, "127.0.0.1", server.server_address[1])


# What the page promises -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "headers", "status", "message"), [
    ("POST", "/api/sample", {"Content-Type": "text/plain"}, 415, "needs Content-Type application/json"),
    ("POST", "/api/sample", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ("POST", "/api/score", {"Content-Type": "multipart/form-data; boundary=x"}, 415,
     "needs Content-Type application/json or image/* or application/octet-stream, got 'multipart/form-data'"),
    ("POST", "/api/score?test_index=0", {"Content-Type": "text/plain"}, 415, "got 'text/plain'"),
    ("POST", "/api/sample", {"Origin": "http://evil.example"}, 403, "cross-origin request from 'http://evil"),
    ("POST", "/api/sample", {"Origin": "null"}, 403, "cross-origin request from 'null'"),
    ("GET", "/api/card", {"Host": "rebound.example:{port}"}, 403, "is not this server's address"),
    ("GET", "/api/card", {"Host": "127.0.0.1:1"}, 403, "is not this server's address"),
])
def test_other_web_pages_cannot_start_jobs_or_read_the_api(server: DemoServer, method: str, path: str,
                                                           headers: dict[str, str], status: int,
                                                           message: str) -> None:
    port = server.server_address[1]
    headers = {name: value.format(port=port) for name, value in headers.items()}
    before = server.app._next_id
    body = json.dumps({"classes": "0", "count": 1}).encode() if method == "POST" else None
    got, _, data = request(server, method, path, body, {"Content-Type": "application/json", **headers})
    assert got == status and message in json.loads(data)["error"]
    assert server.app._next_id == before  # nothing was sampled
    # The same request from the page itself (its own origin, under either loopback name) is served.
    for name in ("127.0.0.1", "localhost"):
        own = {"Host": f"{name}:{port}", "Origin": f"http://{name}:{port}"}
        assert request(server, "GET", "/api/card", None, own)[0] == 200


def test_host_names_follow_the_bound_address(server: DemoServer) -> None:
    port = server.server_address[1]
    assert server.host_allowed(f"LOCALHOST:{port}") and server.host_allowed(f"[::1]:{port}")
    assert not server.host_allowed("127.0.0.1") and not server.host_allowed(f"127.0.0.1:{port}x")
    everywhere = make_server(server.app, "0.0.0.0", 0, quiet=True)
    try:  # bound to every interface: any address and this machine's names, never another DNS name
        other = everywhere.server_address[1]
        assert everywhere.host_allowed(f"10.1.2.3:{other}") and everywhere.host_allowed(f"localhost:{other}")
        assert not everywhere.host_allowed(f"rebound.example:{other}")
    finally:
        everywhere.server_close()


def test_a_stalled_connection_is_closed_and_deep_json_is_a_400(server: DemoServer) -> None:
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1")  # headers never finished
        assert sock.recv(1024) == b""  # closed by the server after LIMITS.socket_timeout_s, not held
    status, body = api(server, "POST", "/api/sample", body=b"[" * 30_000 + b"]" * 30_000)
    assert status == 400 and body["error"] == "the JSON body is nested 30,000 deep; the limit is 8"
    assert json_depth('{"classes": "[[[[[[[[[[", "a": [{"b": "]"}]}') == 3  # brackets in strings do not count


def test_classes_are_checked_arithmetically_with_short_messages(server: DemoServer, tiny_checkpoint: Path,
                                                                capsys, tmp_path) -> None:
    with pytest.raises(ValueError) as err:
        parse_classes("0-99999999999", 10)  # expanding it first would need ~800 GB
    assert len(str(err.value)) < 100
    with pytest.raises(ValueError, match=r"'xxxxx.*\.\.\. \(10,000 characters\)") as err:
        parse_classes("x" * 10_000, 10)
    assert len(str(err.value)) < 200
    assert main(["sample", "--checkpoint", str(tiny_checkpoint), "--classes", "0-100000"]) == 2
    assert len(capsys.readouterr().err) < 200
    assert parse_classes("Sandal, sneaker,0", 10, ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                                   "Shirt", "Sneaker", "Bag", "Ankle boot"]) == [5, 7, 0]
    status, result = api(server, "POST", "/api/sample", {"classes": "three,Nine", "count": 1, "cfg": "none"})
    assert status == 200 and result["labels"] == [3, 9]
    npz = tmp_path / "named.npz"  # the CLI reads the names from the checkpoint's config.json too
    assert main(["sample", "--checkpoint", str(tiny_checkpoint), "--classes", "three,Nine", "--n", "2",
                 "--npz", str(npz)]) == 0
    with np.load(npz) as data:
        assert data["labels"].tolist() == [3, 9]


def test_no_classes_with_guidance_on_samples_unguided(server: DemoServer) -> None:
    status, guided = api(server, "POST", "/api/sample", {"classes": "", "count": 4, "cfg": "resampling", "seed": 2})
    assert status == 200 and guided["cfg"] == "none" and guided["labels"] == []
    _, plain = api(server, "POST", "/api/sample", {"classes": "", "count": 4, "cfg": "none", "seed": 2})
    assert request(server, "GET", guided["npz"])[2] == request(server, "GET", plain["npz"])[2]


def test_every_score_comes_with_the_test_sets_reference(server: DemoServer, tmp_path) -> None:
    status, scored = api(server, "POST", "/api/score", body=png(np.full((8, 8), 255, np.uint8)))
    assert status == 200 and scored["reference"] == "test images average 3.50 bits/dim"
    gap = scored["bpd_unconditional"] - 3.5
    assert scored["verdict"] == f"{abs(gap):.2f} bits/dim {'above' if gap > 0 else 'below'} the test-set mean (3.50)"
    assert scored["best_class_name"] == NAMES[scored["best_class"]]
    with_ood = ScoreReference(1.98, "fashion-mnist", 5.35)
    assert with_ood.compare(5.97).startswith("unlike the training data: nearer the fashion-mnist mean (5.35)")
    assert with_ood.compare(2.5) == "0.52 bits/dim above the test-set mean (1.98)"
    server.app.model.save_pretrained(tmp_path)  # no metrics.json: no reference, said so
    bare = DemoApp.load(tmp_path, limits=LIMITS)
    assert bare.score(bare.decode_upload(png(np.zeros((8, 8), np.uint8)), False))["reference"].startswith(
        "no reference range")
    assert _checkpoint_name(SHIPPED_DIR / "mnist") == _checkpoint_name(Path("mnist")) == "shipped model mnist"
    assert _checkpoint_name(tmp_path) == str(tmp_path)


# The page in a real browser -------------------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    # Explicit browser and driver paths: Selenium Manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def mnist_server() -> Iterator[DemoServer]:
    yield from _serve(DemoApp.load(shipped_checkpoint()))


def test_page_samples_and_scores_in_headless_chromium(browser, mnist_server: DemoServer, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(mnist_server.url)
    wait.until(lambda d: d.find_element(By.ID, "card").text)  # the model card loaded
    shipped_bpd = json.loads((shipped_checkpoint() / "metrics.json").read_text())["test_bits_per_dim"]
    card_text = browser.find_element(By.ID, "card").text
    assert f"test bits/dim {shipped_bpd:.3f}" in card_text and "checkpoint shipped model mnist" in card_text
    stored = json.loads((shipped_checkpoint() / "config.json").read_text())
    # The shipped model is a distilled one: its teacher's whole --init-from chain, then the distillation steps.
    chain = f"{stored['pretrained_steps']:,} steps of batch 64; inverse distilled for {stored['step']} steps"
    assert chain in card_text
    for element, value in (("classes", "3"), ("count", "3"), ("guidance", "1.5"), ("seed", "5")):
        field = browser.find_element(By.ID, element)
        field.clear()
        field.send_keys(value)
    Select(browser.find_element(By.ID, "cfg")).select_by_value("naive")
    browser.find_element(By.ID, "sample-btn").click()
    grid = browser.find_element(By.ID, "grid")
    wait.until(lambda d: grid.get_attribute("data-tiles") == "3")
    # One row of three 28-pixel tiles with 2-pixel gaps, upscaled 2× in the PNG.
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", grid) == [184, 64]
    assert browser.find_element(By.ID, "download-npz").get_attribute("href").endswith(".npz")
    assert browser.find_element(By.ID, "sample-error").text == ""

    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255  # a rough "1"
    upload = tmp_path / "one.png"
    upload.write_bytes(png(digit))
    browser.find_element(By.ID, "upload").send_keys(str(upload))
    table = browser.find_element(By.ID, "score-table")
    wait.until(lambda d: table.get_attribute("data-bpd"))
    assert float(table.get_attribute("data-bpd")) > 0
    assert "bits/dim, no class" in table.text and "most likely class" in table.text
    assert "test images average 1.98 bits/dim" in table.text and "compared with the test set" in table.text
    assert browser.find_element(By.ID, "score-error").text == ""


def test_a_full_grid_leaves_the_model_card_in_a_1400_px_window(browser, mnist_server: DemoServer) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(mnist_server.url)
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "card").text)
    # The grid of the largest request (10 rows of 10 28-pixel tiles, 2-pixel gaps, 2× PNG), shown as the page
    # shows a result, without sampling it.
    side = (10 * 30 + 2) * 2
    tile = "data:image/png;base64," + base64.b64encode(png(np.zeros((side, side), np.uint8))).decode()
    # A checkpoint path too long for the column must wrap, not widen it.
    browser.execute_script("fillTable($('card'), [['checkpoint', '/a-long-directory-name'.repeat(12)], ...card.rows])")
    browser.execute_async_script("showGrid(arguments[0]).then(arguments[1])", {
        "id": 1, "tiles": 100, "rows": 10, "cols": 10, "width": side, "height": side, "seconds": 1.0, "png": tile,
        "npz": "", "cfg": "resampling"})
    # Nothing sticks out to the right: no horizontal scrolling, the card's table inside the window.
    width, scroll, right = browser.execute_script(
        "return [window.innerWidth, document.documentElement.scrollWidth, $('card').getBoundingClientRect().right]")
    assert width == 1400 and scroll <= width and right <= width
