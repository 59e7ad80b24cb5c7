"""The HTTP server (issue 15): endpoint shapes, micro-batching, limits and errors, and a real
uvicorn on the loopback interface for slow clients, disconnects and shutdown with requests in flight.

Everything runs against the tiny model of the `trained_run` fixture, through FastAPI's TestClient
except where a real socket matters. Every network call is to 127.0.0.1 and has a timeout.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from captioner.batching import ServerLimits
from captioner.output import FIELDS, row
from captioner.server import PREDICT_PATH, create_app
from captioner.synthetic import random_scene, render_scene

ROOT = Path(__file__).resolve().parents[1]


def jpeg(seed: int, size: int = 64) -> bytes:
    buffer = io.BytesIO()
    render_scene(random_scene(np.random.default_rng(seed)), size).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, bytes]:
    """Eight good photos, and the bad uploads of the CLI's tests."""
    good = {f"good_{i}.jpg": jpeg(i) for i in range(8)}
    first = good["good_0.jpg"]
    return {**good, "broken.jpg": first[: len(first) // 2], "notes.jpg": b"remember to buy milk\n", "empty.jpg": b""}


@pytest.fixture(scope="module")
def expected(photos, trained_captioner, tmp_path_factory) -> callable:
    """The row a photo gets when captioned alone, through the library (not the server)."""
    folder = tmp_path_factory.mktemp("alone")
    cache: dict = {}

    def alone(name: str, **overrides) -> dict:
        key = (name, tuple(sorted(overrides.items())))
        if key not in cache:
            path = folder / name
            path.write_bytes(photos[name])
            top = overrides.get("num_results", 1)
            result = trained_captioner.caption([str(path)], **overrides)[0]
            cache[key] = row(replace(result, source=name), top)
        return {k: v for k, v in cache[key].items() if k != "image"}

    return alone


@pytest.fixture(scope="module")
def server_captioner(trained_run, tiny_encoder):
    """The server's own Captioner (its own feature cache) over the trained weights."""
    from captioner.captioner import Captioner

    return Captioner(trained_run[1], tiny_encoder)


@pytest.fixture
def make_client(server_captioner):
    """A TestClient over a new app with these limits (the lifespan runs: batcher started and stopped)."""
    with contextlib.ExitStack() as stack:
        def make(captioner=None, **limits) -> TestClient:
            app = create_app(captioner or server_captioner, ServerLimits(**limits))
            return stack.enter_context(TestClient(app, raise_server_exceptions=False))
        yield make


def without_image(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "image"}


# --- endpoint shapes ------------------------------------------------------------------------------


def test_predict_answers_tf_serving_requests_as_the_library_does(make_client, photos, expected):
    client = make_client()
    names = ["good_0.jpg", "good_1.jpg", "good_2.jpg"]
    instances = [{"b64": b64(photos[names[0]])}, {"image_bytes": {"b64": b64(photos[names[1]])}},
                 {"b64": b64(photos[names[2]])}]
    response = client.post(PREDICT_PATH, json={"instances": instances})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["image"] for p in predictions] == [0, 1, 2]  # the instance's index, never a server path
    for name, p in zip(names, predictions):
        assert list(p) == list(FIELDS)
        assert without_image(p) == expected(name)
        assert p["caption"] and p["error"] is None
    # TF Serving clients may name the (only) signature
    named = client.post(PREDICT_PATH, json={"signature_name": "serving_default", "instances": instances[:1]})
    assert named.status_code == 200 and without_image(named.json()["predictions"][0]) == expected(names[0])


def test_caption_uploads_one_or_many_with_their_names(make_client, photos, expected):
    client = make_client()
    one = client.post("/caption", files={"file": ("good_3.jpg", photos["good_3.jpg"], "image/jpeg")})
    assert one.status_code == 200, one.text
    assert one.json()["captions"] == [{"image": "good_3.jpg", **expected("good_3.jpg")}]
    many = client.post("/caption", files=[("files", (n, photos[n], "image/jpeg")) for n in ("good_4.jpg", "good_5.jpg")],
                       params={"top": 3})
    assert many.status_code == 200, many.text
    rows = many.json()["captions"]
    assert [r["image"] for r in rows] == ["good_4.jpg", "good_5.jpg"]
    for r in rows:  # --top 3 widens the default beam to 3, as the CLI does
        assert without_image(r) == expected(r["image"], num_results=3, beam_size=3)
        assert len(r["beams"]) == 3 and [b["score"] for b in r["beams"]] == sorted((b["score"] for b in r["beams"]),
                                                                                    reverse=True)


def test_decoding_options_from_query_or_body_are_applied_and_validated(make_client, photos, expected):
    client = make_client()
    instance = {"b64": b64(photos["good_6.jpg"])}
    for how in ("query", "body"):
        options = {"method": "greedy", "max_len": 3}
        response = (client.post(PREDICT_PATH, json={"instances": [instance]}, params=options) if how == "query"
                    else client.post(PREDICT_PATH, json={"instances": [instance], **options}))
        assert response.status_code == 200, response.text
        assert without_image(response.json()["predictions"][0]) == expected("good_6.jpg", method="greedy", max_len=3)
    form = client.post("/caption", files={"f": ("good_6.jpg", photos["good_6.jpg"])}, data={"beam_size": "1"})
    assert form.status_code == 200 and without_image(form.json()["captions"][0]) == expected("good_6.jpg", beam_size=1)

    refusals = {  # (query, body fields) -> the field the one-line error names
        (("beam_size", "0"),): "beam_size: must be a whole number from 1 to 64, got 0",
        (("beam_size", "wide"),): "beam_size: must be a whole number, got 'wide'",
        (("method", "psychic"),): "method: must be one of beam, greedy, sample",
        (("method", "greedy"), ("top", "2")): "top: more than one result needs beam search",
        (("beamsize", "3"),): "beamsize: not a decoding option",
        (("max_len", "1000"),): "max_len: must be a whole number from 1 to 100",
    }
    for query, message in refusals.items():
        response = client.post(PREDICT_PATH, json={"instances": [instance]}, params=dict(query))
        assert response.status_code == 422 and response.json() == {"error": response.json()["error"]}
        assert response.json()["error"].startswith(message), (query, response.json())
    body = client.post(PREDICT_PATH, json={"instances": [instance], "beam_size": 2.5})
    assert body.status_code == 422 and body.json()["error"].startswith("beam_size: must be a whole number")
    both = client.post(PREDICT_PATH, json={"instances": [instance], "beam_size": 2}, params={"beam_size": 2})
    assert both.status_code == 422 and both.json()["error"].startswith("beam_size: given both")
    twice = client.post("/caption", files={"f": ("a.jpg", photos["good_6.jpg"])},
                        data={"max_len": ["3", "4"]})
    assert twice.status_code == 422 and twice.json()["error"] == "max_len: given twice; give it once"
    twice = client.post(PREDICT_PATH, json={"instances": [instance]}, params=[("top", "1"), ("top", "2")])
    assert twice.status_code == 422 and twice.json()["error"] == "top: given twice; give it once"


def test_a_bad_photo_fails_only_its_own_row(make_client, photos, expected):
    client = make_client()
    names = ["good_0.jpg", "broken.jpg", "good_1.jpg", "notes.jpg", "empty.jpg"]
    reasons = {"broken.jpg": "corrupt or truncated image", "notes.jpg": "not an image in a supported format",
               "empty.jpg": "empty file (0 bytes)"}
    predict = client.post(PREDICT_PATH, json={"instances": [{"b64": b64(photos[n])} for n in names]})
    upload = client.post("/caption", files=[("files", (n, photos[n])) for n in names])
    for response, key, ids in ((predict, "predictions", range(5)), (upload, "captions", names)):
        assert response.status_code == 422, response.text
        document = response.json()
        rows = document[key]
        assert [r["image"] for r in rows] == list(ids)
        for name, r in zip(names, rows):
            if name in reasons:
                assert r["caption"] is None and r["error"].startswith(reasons[name])
            else:
                assert without_image(r) == expected(name)
        assert document["error"].startswith("3 of 5 images could not be captioned: ")
        for image, r in zip(ids, rows):  # the summary names every bad one, and only those
            assert (f"{image}: {r['error']}" in document["error"]) == (r["error"] is not None)
        assert "/tmp" not in response.text and "captioner-serve" not in response.text  # no server paths


def test_malformed_requests_get_a_400_one_liner(make_client, photos):
    client = make_client()
    good = {"b64": b64(photos["good_0.jpg"])}
    cases = {
        "not json": (b"{instances: oops", "body is not JSON"),
        "no instances": (json.dumps({"inputs": [good]}).encode(), 'body must be a JSON object with an "instances"'),
        "not an object": (json.dumps([good]).encode(), 'body must be a JSON object'),
        "empty": (json.dumps({"instances": []}).encode(), "no image: instances is empty"),
        "bad base64": (json.dumps({"instances": [good, {"b64": "not base64!"}]}).encode(),
                       "instances[1]: b64 is not valid base64"),
        "wrong shape": (json.dumps({"instances": [good, {"path": "/etc/passwd"}]}).encode(),
                        'instances[1]: must be {"b64": "..."}'),
        "other signature": (json.dumps({"instances": [good], "signature_name": "x"}).encode(),
                            "signature_name: this model has only 'serving_default'"),
    }
    for name, (content, message) in cases.items():
        response = client.post(PREDICT_PATH, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, (name, response.text)
        assert list(response.json()) == ["error"] and response.json()["error"].startswith(message), name
    assert client.post("/caption", data={"method": "greedy"}).json() == {
        "error": "no image: upload one or more files as multipart/form-data"}
    not_found = client.get("/v1/models/other:predict")
    assert not_found.status_code == 404 and list(not_found.json()) == ["error"]
    assert client.get(PREDICT_PATH).status_code == 405
    assert client.get("/healthz").status_code == 200  # and the server keeps serving


def test_no_request_can_name_a_file_on_the_server(make_client, photos, trained_run):
    client = make_client()
    model = str(trained_run[0] / "model")
    for instance in ({"path": model}, {"b64": b64(model.encode())}, {"image_bytes": {"path": "/etc/passwd"}}):
        response = client.post(PREDICT_PATH, json={"instances": [instance]})
        assert response.status_code in (400, 422) and "root:" not in response.text
    # A path sent as the photo's bytes is just a file that is not an image; the upload's name is only echoed
    as_bytes = client.post(PREDICT_PATH, json={"instances": [{"b64": b64(b"/etc/passwd")}]})
    assert as_bytes.json()["predictions"][0]["error"].startswith("not an image in a supported format")
    named = client.post("/caption", files={"f": ("/etc/passwd", photos["good_0.jpg"])})
    assert named.status_code == 200 and named.json()["captions"][0]["image"] == "/etc/passwd"
    for field in ("model", "path", "cache_dir"):
        response = client.post(PREDICT_PATH, json={"instances": [{"b64": b64(photos["good_0.jpg"])}], field: model})
        assert response.status_code == 422 and response.json()["error"].startswith(f"{field}: not a decoding option")


def test_openapi_documents_both_endpoints(make_client):
    spec = make_client().get("/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/caption"]["post"]["requestBody"]["content"]
    predict = spec["paths"][PREDICT_PATH]["post"]
    assert "instances" in predict["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"method", "beam_size", "top", "max_len"} <= {p["name"] for p in predict["parameters"]}


def test_no_input_gets_a_5xx(make_client, photos):
    client = make_client()
    good = b64(photos["good_0.jpg"])
    bodies = [b"", b"null", b"[]", b'"instances"', b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe\x00garbage",
              b'{"instances": "x"}', b'{"instances": [1]}', b'{"instances": [{"b64": 5}]}',
              b'{"instances": [{"b64": "%s", "extra": 1}]}' % good.encode(), b'{"instances": [null]}',
              b'{"instances": [{"image_bytes": "x"}]}', b'{"instances": [{"b64": "%s"}], "top": null}' % good.encode(),
              b'{"instances": [{"b64": "%s"}], "seed": -1}' % good.encode(),
              b'{"instances": [{"b64": "%s"}], "temperature": "hot"}' % good.encode(),
              b'{"instances": [{"b64": "%s"}], "beam_size": true}' % good.encode()]
    for content in bodies:
        for kind in ("application/json", "text/plain", "multipart/form-data; boundary=x"):
            for path in (PREDICT_PATH, "/caption"):
                response = client.post(path, content=content, headers={"content-type": kind})
                assert 400 <= response.status_code < 500 or response.status_code == 200, (content[:60], kind, path)
                assert isinstance(response.json().get("error", ""), str)
    assert client.get("/healthz").status_code == 200


# --- readiness -----------------------------------------------------------------------------------


def test_healthz_is_503_until_the_model_is_loaded(server_captioner, photos):
    release = threading.Event()

    def slow_loader():
        assert release.wait(30)
        return server_captioner

    with TestClient(create_app(slow_loader, ServerLimits())) as client:
        loading = client.get("/healthz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        early = client.post(PREDICT_PATH, json={"instances": [{"b64": b64(photos["good_0.jpg"])}]})
        assert early.status_code == 503 and early.json() == {"error": "the model is loading"}
        release.set()
        for _ in range(100):
            if client.get("/healthz").status_code == 200:
                break
            time.sleep(0.05)
        assert client.get("/healthz").json()["status"] == "ready"
        assert client.post(PREDICT_PATH, json={"instances": [{"b64": b64(photos["good_0.jpg"])}]}).status_code == 200


def test_a_model_that_fails_to_load_is_reported_without_its_path(tmp_path, caplog):
    from captioner.captioner import Captioner

    told = []
    missing = tmp_path / "secret-model-folder"
    app = create_app(lambda: Captioner.load(missing), ServerLimits(), on_load_error=told.append)
    with caplog.at_level(logging.ERROR, logger="captioner.server"), TestClient(app) as client:
        for _ in range(100):
            if client.get("/healthz").json()["status"] != "loading":
                break
            time.sleep(0.05)
        health = client.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "secret-model-folder" not in health.text
        response = client.post(PREDICT_PATH, json={"instances": [{"b64": "AAAA"}]})
        assert response.json() == {"error": "no model is loaded"} and response.status_code == 503
    assert len(told) == 1 and "model could not be loaded" in caplog.text  # the operator sees why


# --- micro-batching ------------------------------------------------------------------------------


def test_concurrent_requests_share_passes_and_answer_as_if_alone(make_client, photos, expected):
    client = make_client(batch_window_ms=150)
    names = [f"good_{i}.jpg" for i in range(8)]
    # Two option groups: beam (the default) and greedy requests cannot share a pass with each other.
    jobs = [(n, {}) for n in names] + [(n, {"method": "greedy"}) for n in names[:4]]

    def send(job):
        name, params = job
        return client.post(PREDICT_PATH, json={"instances": [{"b64": b64(photos[name])}]}, params=params)

    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(send, jobs))
    for (name, params), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        assert without_image(response.json()["predictions"][0]) == expected(name, **params)
    stats = client.app.state.batcher.stats
    assert stats.photos == len(jobs)
    assert stats.requests_merged >= 1 and stats.largest > 1  # photos of several requests in one pass
    assert stats.passes < len(jobs)
    assert client.get("/healthz").json()["largest_pass"] == stats.largest


def test_photos_queued_during_a_pass_start_the_next_at_once():
    """The window counts from a photo's arrival (TF Serving's batch_timeout_micros): a photo that
    waited through a pass longer than the window is not held for a fresh window after it."""
    from captioner.batching import MicroBatcher

    window, first_pass = 0.4, 0.6
    passes: list[tuple[float, float, list]] = []

    def caption(sources, options):
        start = time.monotonic()
        time.sleep(first_pass if not passes else 0)
        passes.append((start, time.monotonic(), list(sources)))
        return [f"caption of {s}" for s in sources]

    async def scenario():
        batcher = MicroBatcher(caption, window_ms=window * 1000)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(["a"], "beam"))
        await asyncio.sleep(window + 0.1)  # the first pass is under way
        second = await batcher.submit(["b"], "beam")
        assert await first == ["caption of a"] and second == ["caption of b"]
        await batcher.stop()

    began = time.monotonic()
    asyncio.run(scenario())
    (start_1, end_1, sources_1), (start_2, _, sources_2) = passes
    assert (sources_1, sources_2) == (["a"], ["b"])
    assert start_1 - began >= window * 0.9  # a lone photo waits its window once
    assert start_2 - end_1 < window / 2  # the old rule waited a whole window more here


def test_batch_threads_run_passes_at_once_and_one_thread_runs_them_in_turn():
    """TF Serving's num_batch_threads: with two, a pass starts while another runs; with one, never."""
    from captioner.batching import MicroBatcher

    def overlap(threads: int) -> bool:
        both_in = threading.Barrier(2, timeout=30 if threads == 2 else 0.5)  # met at once, or never
        met: list[bool] = []

        def caption(sources, options):
            try:
                both_in.wait()
                met.append(True)
            except threading.BrokenBarrierError:
                met.append(False)
            return [f"{options} caption of {s}" for s in sources]

        async def scenario():
            batcher = MicroBatcher(caption, window_ms=0, threads=threads)
            await batcher.start()
            first = asyncio.create_task(batcher.submit(["a"], "beam"))
            await asyncio.sleep(0.2)  # its pass has begun
            assert await batcher.submit(["b"], "beam") == ["beam caption of b"]
            assert await first == ["beam caption of a"]
            await batcher.stop()

        asyncio.run(scenario())
        return all(met)

    assert overlap(threads=2)
    assert not overlap(threads=1)


def test_idle_workers_do_not_split_a_request_between_them():
    """One batch is open at a time (as in TF Serving), so a lone request's photos share one pass."""
    from captioner.batching import MicroBatcher

    passes: list[list] = []

    def caption(sources, options):
        passes.append(list(sources))
        return [f"caption of {s}" for s in sources]

    async def scenario():
        batcher = MicroBatcher(caption, window_ms=50, threads=2)
        await batcher.start()
        assert await batcher.submit(list("abcd"), "beam") == [f"caption of {s}" for s in "abcd"]
        await batcher.stop()

    asyncio.run(scenario())
    assert passes == [list("abcd")]


def test_the_server_runs_as_many_passes_at_once_as_its_limits_say():
    assert create_app(lambda: None, ServerLimits(batch_threads=3)).state.batcher.threads == 3


def test_seeded_sampling_is_never_shared_so_it_matches_alone(make_client, photos, expected):
    client = make_client(batch_window_ms=150)
    jobs = [(f"good_{i}.jpg", {"method": "sample", "seed": 7, "temperature": 1.5}) for i in range(4)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: client.post(
            PREDICT_PATH, json={"instances": [{"b64": b64(photos[job[0]])}], **job[1]}), jobs))
    for (name, params), response in zip(jobs, responses):
        assert without_image(response.json()["predictions"][0]) == expected(name, **params)
    assert client.app.state.batcher.stats.requests_merged == 0


# --- limits --------------------------------------------------------------------------------------


def test_body_size_is_limited_by_header_and_while_streaming(make_client, photos):
    client = make_client(max_body_bytes=50_000)
    big = {"instances": [{"b64": b64(os.urandom(60_000))}]}
    declared = client.post(PREDICT_PATH, json=big)
    assert declared.status_code == 413 and declared.json()["error"].startswith("request body too large: ")
    assert declared.headers["connection"] == "close"

    def chunks():  # no Content-Length: counted as it arrives (that reading stops there: see the live test)
        for _ in range(10):
            yield b"x" * 8192

    streamed = client.post("/caption", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413 and streamed.json() == {
        "error": "request body too large: over that, at most 50,000 bytes"}
    assert client.post("/caption", files={"f": ("a.jpg", photos["good_0.jpg"])}).status_code == 200


def test_too_many_images_is_refused_whole(make_client, photos):
    client = make_client(max_images=3)
    instances = [{"b64": b64(photos[f"good_{i}.jpg"])} for i in range(4)]
    predict = client.post(PREDICT_PATH, json={"instances": instances})
    assert predict.status_code == 413 and predict.json() == {"error": "too many images: 4, at most 3 per request"}
    upload = client.post("/caption", files=[("f", (f"{i}.jpg", photos[f"good_{i}.jpg"])) for i in range(4)])
    assert upload.status_code == 413 and upload.json() == {"error": "too many images: at most 3 per request"}
    assert client.post(PREDICT_PATH, json={"instances": instances[:3]}).status_code == 200


def test_pixel_bombs_are_refused_from_the_header(make_client, photos, expected):
    client = make_client(max_pixels=1_000_000)
    bomb = io.BytesIO()
    Image.new("1", (2000, 2000)).save(bomb, "PNG")  # 4 megapixels in a few kilobytes
    assert len(bomb.getvalue()) < 5_000
    response = client.post("/caption", files=[("f", ("bomb.png", bomb.getvalue())), ("f", ("good_0.jpg", photos["good_0.jpg"]))])
    assert response.status_code == 422
    bad, good = response.json()["captions"]
    assert bad == {"image": "bomb.png", "caption": None, "log_prob": None, "score": None, "familiarity": None,
                   "unfamiliar": None, "labels": None, "error": "image too large (2000x2000, over 1,000,000 pixels)"}
    assert without_image(good) == expected("good_0.jpg")
    assert response.json()["error"] == "1 of 2 images could not be captioned: bomb.png: " + bad["error"]


class SlowCaptioner:
    """A Captioner stand-in whose passes take `seconds` (the server only calls `load_photo`,
    `iter_captions` and `options`)."""

    def __init__(self, captioner, seconds: float):
        self.captioner, self.seconds = captioner, seconds

    @property
    def options(self):
        return self.captioner.options

    def load_photo(self, *args, **kwargs):
        return self.captioner.load_photo(*args, **kwargs)

    def iter_captions(self, *args, **kwargs):
        time.sleep(self.seconds)
        return self.captioner.iter_captions(*args, **kwargs)


def test_a_request_that_takes_too_long_gets_a_clean_503_and_the_server_goes_on(make_client, server_captioner,
                                                                                photos):
    slow = SlowCaptioner(server_captioner, 1.0)
    client = make_client(lambda: slow, request_timeout_s=0.3)
    for _ in range(100):
        if client.get("/healthz").status_code == 200:
            break
        time.sleep(0.02)
    response = client.post(PREDICT_PATH, json={"instances": [{"b64": b64(photos["good_0.jpg"])}]})
    assert response.status_code == 503 and response.json() == {
        "error": "not captioned within 0.3 s; the server is busy, try again later"}
    slow.seconds = 0
    for _ in range(250):  # the pass under way finishes (its answer is dropped), however busy the machine
        if client.get("/healthz").json()["pending"] == 0:
            break
        time.sleep(0.02)
    assert client.post(PREDICT_PATH, json={"instances": [{"b64": b64(photos["good_0.jpg"])}]}).status_code == 200


def test_too_many_waiting_photos_get_503_busy(make_client, server_captioner, photos):
    slow = SlowCaptioner(server_captioner, 0.5)
    client = make_client(lambda: slow, max_images=2, max_pending=2, max_batch=2)
    for _ in range(100):
        if client.get("/healthz").status_code == 200:
            break
        time.sleep(0.02)
    two = {"instances": [{"b64": b64(photos["good_0.jpg"])}] * 2}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, PREDICT_PATH, json=two)
        time.sleep(0.2)
        second = pool.submit(client.post, PREDICT_PATH, json=two)
        assert second.result().status_code == 503 and second.result().json() == {
            "error": "the server is busy; try again later"}
        assert first.result().status_code == 200


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_images: must be a whole number of at least 1, got 0"):
        ServerLimits(max_images=0)
    with pytest.raises(ValueError, match="request_timeout_s: must be more than 0"):
        ServerLimits(request_timeout_s=float("nan"))


# --- a real server on the loopback interface -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(server_captioner):
    """uvicorn in a thread on 127.0.0.1 with a free port: (base URL, app)."""
    import uvicorn

    app = create_app(server_captioner, ServerLimits(request_timeout_s=1.5, max_body_bytes=200_000))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        time.sleep(0.05)
    yield url, port
    server.should_exit = True
    thread.join(10)
    assert not thread.is_alive()


def raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return s


def read_response(s: socket.socket) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one response; the server must close the connection after it."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), json.loads(body), headers


def test_a_slow_client_times_out_without_holding_up_others(live_server, photos, caplog):
    url, port = live_server
    body = json.dumps({"instances": [{"b64": b64(photos["good_0.jpg"])}]}).encode()
    slow = raw_request(port, f"POST {PREDICT_PATH} HTTP/1.1\nHost: x\nContent-Type: application/json\n"
                       f"Content-Length: {len(body)}\n", body[:10])
    started = time.monotonic()
    fast = httpx.post(url + PREDICT_PATH, content=body, timeout=10)  # while the slow one dribbles
    assert fast.status_code == 200 and time.monotonic() - started < 1.0
    with contextlib.suppress(OSError):
        for i in range(10, 40):  # a byte every 0.1 s: the 1.5 s budget runs out first
            slow.sendall(body[i : i + 1])
            time.sleep(0.1)
    status, answer, headers = read_response(slow)
    assert status == 408 and headers["connection"] == "close" and answer == {"error": "request body not received within 1.5 s"}
    assert httpx.get(url + "/healthz", timeout=5).status_code == 200


def test_a_client_that_disconnects_mid_upload_harms_nothing(live_server, photos, caplog):
    url, port = live_server
    body = json.dumps({"instances": [{"b64": b64(photos["good_0.jpg"])}]}).encode()
    with caplog.at_level(logging.WARNING):
        for path, kind in ((PREDICT_PATH, "application/json"), ("/caption", "multipart/form-data; boundary=b")):
            s = raw_request(port, f"POST {path} HTTP/1.1\nHost: x\nContent-Type: {kind}\n"
                            f"Content-Length: {len(body)}\n", b"--b\r\n" + body[:100])
            time.sleep(0.2)
            s.close()  # gone half-way through its upload
        time.sleep(0.3)
        response = httpx.post(url + PREDICT_PATH, content=body, timeout=10)
    assert response.status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # no traceback, no 500


def test_a_huge_streamed_upload_is_cut_off_at_the_limit(live_server):
    url, port = live_server
    part = b'--b\r\nContent-Disposition: form-data; name="f"; filename="a.jpg"\r\n\r\n'
    s = raw_request(port, "POST /caption HTTP/1.1\nHost: x\nContent-Type: multipart/form-data; boundary=b\n"
                    "Transfer-Encoding: chunked\n", b"%x\r\n%s\r\n" % (len(part), part))
    sent = 0
    with contextlib.suppress(OSError):  # the server closes the connection once it has answered
        for _ in range(2000):  # up to 128 MiB
            s.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
            sent += 0x10000
    status, answer, headers = read_response(s)
    assert status == 413 and headers["connection"] == "close" and answer["error"] == "request body too large: over that, at most 200,000 bytes"
    assert sent < 64 * 2**20
    assert httpx.get(url + "/healthz", timeout=5).status_code == 200


def test_serve_command_finishes_requests_in_flight_on_sigterm(trained_run, photos, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CAPTIONER_HOME": str(tmp_path / "home")}
    process = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--model", str(trained_run[0] / "model"),
                                "--port", str(port), "--batch-window-ms", "3000"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            assert process.poll() is None, process.communicate()
            time.sleep(0.2)
        else:
            pytest.fail("the server did not become ready in 90 s")
        body = {"instances": [{"b64": b64(photos[f"good_{i}.jpg"])} for i in range(2)]}
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(httpx.post, url + PREDICT_PATH, json=body, timeout=30) for _ in range(4)]
            for _ in range(100):  # until all 8 photos wait in the (long) batch window
                if httpx.get(url + "/healthz", timeout=5).json()["pending"] == 8:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the requests did not reach the server")
            process.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 4
        assert all(p["caption"] for r in responses for p in r.json()["predictions"])
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # uvicorn >= 0.29 re-raises the signal once shut down, so the exit says "ended by SIGTERM"
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert "Application shutdown complete" in stderr
    assert f"serving captions on http://127.0.0.1:{port}" in stderr and "Traceback" not in stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/healthz", timeout=2)


def test_serve_command_refuses_a_missing_model_before_starting(tmp_path):
    from captioner import cli

    with pytest.raises(cli.UsageError, match="--model: .*: no such model bundle folder"):
        cli.check_args(cli.build_parser().parse_args(["serve", "--model", str(tmp_path / "nope")]))
    with pytest.raises(cli.UsageError, match="--max-images: must be a whole number of at least 1"):
        cli.cmd_serve(cli.build_parser().parse_args(["serve", "--max-images", "0"]))
