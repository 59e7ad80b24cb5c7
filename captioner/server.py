"""The HTTP server: `captioner serve` (FastAPI + uvicorn).

Endpoints:
  POST /v1/models/captioner:predict  TensorFlow Serving's JSON shape: {"instances": [{"b64": ...}]}
                                     (or [{"image_bytes": {"b64": ...}}]) -> {"predictions": [row, ...]}
  POST /caption                      multipart file uploads (one or many)  -> {"captions": [row, ...]}
  GET  /healthz                      503 until the model is loaded, then 200
  GET  /docs, /openapi.json          FastAPI's generated docs

Rows are `captioner.output.row`, the CLI's JSONL rows, with `image` the instance's index or the
upload's file name: never a path on the server, and no request can name one. Decoding goes
through `Captioner`; concurrent requests share passes through `captioner.batching`. Every error
is JSON `{"error": "<one line>"}`; a photo that cannot be read fails only its own row (the
response is then 422 and says which), and bad input never gets a 5xx.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from captioner.batching import BatcherBusy, BatcherClosed, MicroBatcher, ServerLimits
from captioner.decoding import DecodeOptions, OptionError
from captioner.errors import first_line
from captioner.images import ImageError
from captioner.output import row

if TYPE_CHECKING:  # captioner.captioner imports TensorFlow; the app only needs it once loading
    from captioner.captioner import CaptionResult, Captioner

log = logging.getLogger("captioner.server")

PREDICT_PATH = "/v1/models/captioner:predict"
# Decoding fields a request may set, as it spells them; `top` is the CLI's --top (num_results).
INT_FIELDS = ("beam_size", "max_len", "top", "seed")
FLOAT_FIELDS = ("length_penalty", "temperature")
OPTION_FIELDS = ("method", *INT_FIELDS, *FLOAT_FIELDS)
# TF Serving clients may name the signature; this model has one.
TF_SERVING_FIELDS = {"signature_name": "serving_default"}


class RequestError(Exception):
    """A request the server refuses as a whole: answered as {"error": message} with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse a body over `max_bytes` from its Content-Length, or, for a body of
    no declared length (or one that lies), as soon as the bytes received pass the limit, so a
    client streaming gigabytes is cut off after `max_bytes`, not buffered."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send, int(declared) if declared.isdigit() else None)
        received, started, complete = 0, False, False

        async def counting_receive():
            nonlocal received, complete
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def watching_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not complete:  # answered before the whole body came (an error): the rest is never
                    # read, so the connection cannot carry another request; uvicorn closes it
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send, None)

    async def _refuse(self, send, declared: int | None) -> None:
        size = f"{declared:,} bytes" if declared is not None else "over that"
        body = json.dumps({"error": f"request body too large: {size}, at most {self.max_bytes:,} bytes"}).encode()
        # Connection: close, as the rest of the body is never read.
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def decode_options(defaults: DecodeOptions, given: dict[str, Any]) -> DecodeOptions:
    """`defaults` with a request's decoding fields (query strings or JSON values), validated by
    `DecodeOptions`; `RequestError` 422 naming the field as the request spelled it."""
    unknown = sorted(set(given) - set(OPTION_FIELDS))
    if unknown:
        raise RequestError(422, f"{unknown[0]}: not a decoding option (use {', '.join(OPTION_FIELDS)})")
    values = {name: _typed(name, value) for name, value in given.items()}
    top = values.pop("top", 1)
    if top is None:
        top = 1
    values["num_results"] = top
    if isinstance(top, int) and top > 1 and "beam_size" not in values:  # top=5 asks for 5 beams, as --top does
        values["beam_size"] = max(top, defaults.beam_size)
    try:
        return dataclasses.replace(defaults, **values)
    except OptionError as e:
        name = "top" if e.field == "num_results" else e.field
        raise RequestError(422, f"{name}: {e.reason}") from None


def _typed(name: str, value: Any) -> Any:
    """A query string's text as the field's type; JSON values pass as they are (DecodeOptions
    refuses a wrong type by name)."""
    if not isinstance(value, str) or name == "method":
        return value
    kind = int if name in INT_FIELDS else float
    try:
        return kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise RequestError(422, f"{name}: must be {what}, got {value!r}") from None


def create_app(captioner_or_loader: Captioner | Callable[[], Captioner], limits: ServerLimits = ServerLimits(),
               on_load_error: Callable[[Exception], None] | None = None) -> FastAPI:
    """The FastAPI app. Give a loaded `Captioner`, or a function that loads one: it then runs in
    the background at start-up, and `/healthz` says 503 until it is done (and for good if it
    fails; `on_load_error` is told, e.g. to stop the server)."""
    from captioner.captioner import CaptionResult, Captioner

    state: dict[str, Any] = {"captioner": None, "status": "loading"}

    def caption_pass(pixels: list[np.ndarray], options: DecodeOptions) -> list[CaptionResult]:
        # One encoder pass and one decoder pass for the whole batch (photos decoded as they came).
        return list(state["captioner"].iter_captions(pixels, options, batch_size=limits.max_batch))

    batcher: MicroBatcher = MicroBatcher(caption_pass, limits.batch_window_ms, limits.max_batch, limits.max_pending,
                                         limits.batch_threads)

    async def load() -> None:
        try:
            captioner = captioner_or_loader if isinstance(captioner_or_loader, Captioner) else \
                await asyncio.to_thread(captioner_or_loader)
        except Exception as e:  # noqa: BLE001 - reported to the operator, not to clients
            log.error("captioner: error: model could not be loaded: %s", first_line(e))
            state["status"] = "failed"
            if on_load_error:
                on_load_error(e)
            return
        state["captioner"], state["status"] = captioner, "ready"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        loading = asyncio.create_task(load())
        if isinstance(captioner_or_loader, Captioner):
            await loading  # nothing to wait for: ready before the first request
        yield
        loading.cancel()
        await batcher.stop()  # uvicorn has let in-flight requests finish; this drains what is queued

    app = FastAPI(title="captioner", version=_version(), lifespan=lifespan,
                  description="Captions for photos: TensorFlow Serving's predict API and multipart uploads.")
    app.state.batcher, app.state.limits, app.state.model = batcher, limits, state
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        return error_response(e.status, e.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return error_response(422, f"{where}: {first.get('msg', 'invalid')}")

    def ready() -> Captioner:
        if state["status"] != "ready":
            raise RequestError(503, "the model is loading" if state["status"] == "loading" else "no model is loaded")
        return state["captioner"]

    def deadline() -> float:
        """When a request that starts now must be answered: one budget for receiving and captioning."""
        return asyncio.get_running_loop().time() + limits.request_timeout_s

    async def body(request: Request, until: float) -> bytes:
        """The whole body (BodyLimit bounds it), or 408 if it has not arrived by `until`."""
        try:
            async with asyncio.timeout_at(until):
                return b"".join([chunk async for chunk in request.stream()])
        except TimeoutError:
            raise RequestError(408, f"request body not received within {limits.request_timeout_s:g} s") from None

    async def caption(named: list[tuple[str, bytes]], options: DecodeOptions, until: float) -> list[dict]:
        """Rows for (name, bytes) photos, in order. Each request decodes its own photos in a
        worker thread as it arrives (the loader checks bytes as it checks a file: formats, pixels,
        corruption), so decoding overlaps the pass under way; passes then run only the networks."""
        captioner = state["captioner"]
        try:
            async with asyncio.timeout_at(until):
                loaded = await asyncio.to_thread(_load_photos, captioner, [data for _, data in named],
                                                 limits.max_pixels)
                pixels = [p for p in loaded if not isinstance(p, ImageError)]
                results = iter(await batcher.submit(pixels, options, shareable=options.method != "sample")
                               if pixels else [])
        except TimeoutError:
            raise RequestError(503, f"not captioned within {limits.request_timeout_s:g} s; the server is "
                               "busy, try again later") from None
        except BatcherBusy:
            raise RequestError(503, "the server is busy; try again later") from None
        except BatcherClosed:
            raise RequestError(503, "the server is shutting down") from None
        return [row(CaptionResult(name, error=p.reason) if isinstance(p, ImageError) else
                    dataclasses.replace(next(results), source=name), options.num_results)
                for (name, _), p in zip(named, loaded)]

    def answer(key: str, rows: list[dict], image_key: Callable[[dict], Any] | None = None) -> JSONResponse:
        failed = [r for r in rows if r["error"] is not None]
        if image_key:
            for r in rows:
                r["image"] = image_key(r)
        if not failed:
            return JSONResponse({key: rows})
        names = "; ".join(f"{r['image']}: {r['error']}" for r in failed)
        return JSONResponse({"error": f"{len(failed)} of {len(rows)} images could not be captioned: {names}",
                             key: rows}, status_code=422)

    @app.get("/healthz", summary="Ready? 200 once the model is loaded, 503 before (or if it failed).")
    async def healthz() -> JSONResponse:
        stats = batcher.stats
        status = 200 if state["status"] == "ready" else 503
        return JSONResponse({"status": state["status"], "passes": stats.passes, "photos": stats.photos,
                             "largest_pass": stats.largest, "pending": batcher.pending}, status_code=status)

    @app.post(PREDICT_PATH, summary="TensorFlow Serving's predict: base64 photos in, captions out.",
              openapi_extra=_predict_openapi())
    async def predict(request: Request) -> JSONResponse:
        captioner, until = ready(), deadline()
        try:
            data = await body(request, until)
        except ClientDisconnect:
            return error_response(400, "client disconnected")
        try:
            document = json.loads(data)
        except ValueError as e:  # UnicodeDecodeError included
            raise RequestError(400, f"body is not JSON ({first_line(e)})") from None
        except RecursionError:  # [[[[...]]]] nested deeper than the parser goes
            raise RequestError(400, "body is not JSON this server reads (nested too deeply)") from None
        if not isinstance(document, dict) or not isinstance(document.get("instances"), list):
            raise RequestError(400, 'body must be a JSON object with an "instances" list')
        instances = document.pop("instances")
        for name, value in TF_SERVING_FIELDS.items():
            if document.get(name, value) != value:
                raise RequestError(400, f"{name}: this model has only {value!r}")
            document.pop(name, None)
        check_count(len(instances))
        options = decode_options(captioner.options, {**dict(request.query_params), **_no_clash(request, document)})
        photos = [(str(i), _instance_bytes(i, instance)) for i, instance in enumerate(instances)]
        rows = await caption(photos, options, until)
        return answer("predictions", rows, image_key=lambda r: int(r["image"]))

    @app.post("/caption", summary="Caption uploaded photos (multipart/form-data, one or many files).",
              openapi_extra=_upload_openapi())
    async def caption_uploads(request: Request) -> JSONResponse:
        captioner, until = ready(), deadline()
        try:
            async with asyncio.timeout_at(until):
                form = await request.form(max_files=limits.max_images, max_fields=len(OPTION_FIELDS))
        except TimeoutError:
            raise RequestError(408, f"request body not received within {limits.request_timeout_s:g} s") from None
        except ClientDisconnect:
            return error_response(400, "client disconnected")
        except StarletteHTTPException as e:  # starlette's multipart limits and parse errors
            if str(e.detail).startswith("Too many files"):
                raise RequestError(413, f"too many images: at most {limits.max_images} per request") from None
            raise RequestError(400, f"body is not valid multipart/form-data ({e.detail})") from None
        try:
            uploads = [(v.filename or f"upload {i}", v) for i, (_, v) in
                       enumerate(item for item in form.multi_items() if isinstance(item[1], UploadFile))]
            fields = [(k, v) for k, v in form.multi_items() if not isinstance(v, UploadFile)]
            if len({k for k, _ in fields}) < len(fields):
                raise RequestError(422, f"{_first_repeated([k for k, _ in fields])}: given twice; give it once")
            fields = dict(fields)
            if not uploads:
                raise RequestError(400, "no image: upload one or more files as multipart/form-data")
            check_count(len(uploads))
            options = decode_options(captioner.options, {**dict(request.query_params), **_no_clash(request, fields)})
            photos = [(name, await upload.read()) for name, upload in uploads]
        finally:
            await form.close()
        return answer("captions", await caption(photos, options, until))

    def check_count(n: int) -> None:
        if n == 0:
            raise RequestError(400, "no image: instances is empty")
        if n > limits.max_images:
            raise RequestError(413, f"too many images: {n}, at most {limits.max_images} per request")

    return app


def _first_repeated(names: list[str]) -> str:
    return next(n for i, n in enumerate(names) if n in names[:i])


def _no_clash(request: Request, fields: dict[str, Any]) -> dict[str, Any]:
    """Body fields, refusing one that the query also sets, or sets twice (which would win is not obvious)."""
    repeated = sorted(k for k in request.query_params if len(request.query_params.getlist(k)) > 1)
    if repeated:
        raise RequestError(422, f"{repeated[0]}: given twice; give it once")
    both = sorted(set(fields) & set(request.query_params))
    if both:
        raise RequestError(422, f"{both[0]}: given both in the query and in the body; give it once")
    return fields


def _instance_bytes(index: int, instance: Any) -> bytes:
    """The photo bytes of a TF Serving instance: {"b64": ...} or {"image_bytes": {"b64": ...}}."""
    if isinstance(instance, dict) and set(instance) == {"image_bytes"}:
        instance = instance["image_bytes"]
    if not (isinstance(instance, dict) and set(instance) == {"b64"} and isinstance(instance["b64"], str)):
        raise RequestError(400, f'instances[{index}]: must be {{"b64": "..."}} or {{"image_bytes": {{"b64": "..."}}}}')
    try:
        return base64.b64decode(instance["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"instances[{index}]: b64 is not valid base64") from None


def _load_photos(captioner: Captioner, photos: list[bytes], max_pixels: int) -> list[np.ndarray | ImageError]:
    """Each photo as the encoder takes it, or why it cannot be used."""
    loaded: list[np.ndarray | ImageError] = []
    for data in photos:
        try:
            loaded.append(captioner.load_photo(data, max_pixels))
        except ImageError as e:
            loaded.append(e)
    return loaded


def _version() -> str:
    from captioner.version import __version__

    return __version__


def _predict_openapi() -> dict:
    """The request body for the docs page (the endpoint reads the body itself, to bound and time it)."""
    photo = {"type": "object", "properties": {"b64": {"type": "string", "format": "byte"}}, "required": ["b64"]}
    instance = {"oneOf": [photo, {"type": "object", "properties": {"image_bytes": photo}, "required": ["image_bytes"]}]}
    options = {name: {"type": "string" if name == "method" else "integer" if name in INT_FIELDS else "number"}
               for name in OPTION_FIELDS}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["instances"],
        "properties": {"instances": {"type": "array", "items": instance}, **options}}}}},
        "parameters": _option_parameters()}


def _upload_openapi() -> dict:
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}},
        "parameters": _option_parameters()}


def _option_parameters() -> list[dict]:
    kinds = {name: "string" if name == "method" else "integer" if name in INT_FIELDS else "number"
             for name in OPTION_FIELDS}
    return [{"name": name, "in": "query", "required": False, "schema": {"type": kind}} for name, kind in kinds.items()]
