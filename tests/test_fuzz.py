"""Schemathesis against the real gateway: uvicorn on 127.0.0.1, the torch engine on a tiny gated bundle.

Every operation of the served OpenAPI document gets schemathesis' coverage phase (boundary and invalid
values, missing fields, wrong content types, undeclared methods) and its fuzzing phase (random valid and
invalid requests). Each response is checked: never a 5xx, a declared status, a declared content type,
headers and body that match their declared schemas, invalid requests refused, and valid ones accepted or
refused only as the schema cannot foresee (415: bytes that are no image; 422: e.g. an empty mask).

The schema cannot say "an image", so half the valid removal and score bodies are replaced by realistic
requests (see real_request): small real photos and masks of drawn size, mode and format, with field values
a client would send, which runs the model end to end.
"""

from __future__ import annotations

import collections
import copy
import io
import itertools
import shutil
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import numpy as np
import pytest
import schemathesis
from conftest import serve_in_thread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from schemathesis.core.failures import FailureGroup
from schemathesis.transport.serialization import Binary
from skimage import data as skdata

from cleanplate.serving.app import create_app
from cleanplate.serving.settings import Settings

# pytest parametrizes from the document at import, so it is built here; the OpenCV engine needs no bundle and
# the document does not depend on the engine. test_fuzzed_document_is_the_served_one ties it to the server.
DOCUMENT = create_app(Settings(engine="opencv")).openapi()
# Valid (schema-conforming) requests may be refused only with a status the schema cannot rule out: 415 for
# bytes that are no image, 422 for a request the model cannot serve (empty or full mask, sizes that differ,
# no alpha to take the mask from, more attempts than the server's configured limit). A 400 here means the
# schema is looser than the endpoint, as it was for 0-byte uploads before they were declared minLength 1.
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "415", "422"]}}})
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, positive_data_acceptance, unsupported_method]
OPERATIONS = ["POST /v1/remove", "POST /v1/detect", "POST /v1/score", "GET /healthz", "GET /readyz", "GET /metrics"]
STATUSES: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
REMOVED_AS: collections.Counter[str] = collections.Counter()  # media types of the removals' 200 responses
ACCEPT_JSON = itertools.cycle([False, True])  # every other removal asks for the JSON body
PHOTO = skdata.astronaut()  # 512x512 RGB
# Each operation's file parts, its body's schema, and the values a client sends in its other fields.
FILE_PARTS = {"POST /v1/remove": ("image", "mask"), "POST /v1/detect": ("image",),
              "POST /v1/score": ("source", "result", "mask")}
BODY_SCHEMAS = {operation: jsonschema_rs.validator_for({**DOCUMENT["components"]["schemas"][name],
                                                         "components": DOCUMENT["components"]})
                for operation, name in (("POST /v1/remove", "Body_remove_v1_remove_post"),
                                        ("POST /v1/detect", "Body_detect_overlays_v1_detect_post"),
                                        ("POST /v1/score", "Body_score_v1_score_post"))}
CLIENT_FIELDS = {
    "POST /v1/remove": {"dilate_px": st.integers(0, 4), "steps": st.integers(1, 4), "seed": st.integers(0, 2**31 - 1),
                        "quality_gate": st.booleans(), "threshold": st.floats(0, 1), "max_attempts": st.integers(1, 3),
                        "output_format": st.sampled_from(["png", "jpeg", "webp"])},
    "POST /v1/detect": {},
    "POST /v1/score": {"dilate_px": st.integers(0, 4), "threshold": st.floats(0, 1)},
}


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


@st.composite
def real_request(draw: st.DrawFn, operation: str) -> dict:
    """A body for ``operation`` as a client sends it: a photo crop (12..48 px a side, or now and then 1..11;
    L, RGB or RGBA; PNG, JPEG, WEBP or TIFF) and a box mask (1 in 10 of another size), and some of the
    optional fields."""
    side = st.one_of(st.integers(12, 48), st.integers(1, 11))
    h, w = draw(side), draw(side)
    y, x = draw(st.integers(0, 512 - h)), draw(st.integers(0, 512 - w))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "WEBP", "TIFF"]))
    mode = draw(st.sampled_from(["RGB", "L"] if fmt == "JPEG" else ["RGB", "L", "RGBA"]))
    y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
    y1, x1 = draw(st.integers(y0 + 1, min(h, y0 + 1 + h // 3))), draw(st.integers(x0 + 1, min(w, x0 + 1 + w // 3)))
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 255
    crop = PHOTO[y:y + h, x:x + w]
    fields = draw(st.fixed_dictionaries({}, optional=CLIENT_FIELDS[operation]))
    other_size = draw(st.sampled_from([False] * 9 + [True]))
    mask_part = encode(np.pad(mask, ((0, 1), (0, 0))) if other_size else mask, "PNG")
    if operation == "POST /v1/score":
        result = crop.copy()
        result[mask > 0] = crop.reshape(-1, 3).mean(axis=0).astype(np.uint8)
        return {**fields, "source": encode(crop, fmt), "result": encode(result, fmt), "mask": mask_part}
    image = {"RGB": crop, "L": crop.mean(axis=2).astype(np.uint8), "RGBA": np.dstack([crop, 255 - mask])}[mode]
    if operation == "POST /v1/detect":
        return {**fields, "image": encode(image, fmt)}
    if mode == "RGBA" and draw(st.booleans()):
        return {**fields, "image": encode(image, fmt)}  # the mask is the image's transparent box
    return {**fields, "image": encode(image, fmt), "mask": mask_part}


def is_valid(operation: str, body: object) -> bool:
    """Whether a generated body is valid: its file parts are non-empty files and the rest conforms."""
    if not isinstance(body, dict):
        return False
    files = [k for k in FILE_PARTS[operation] if k in body]
    if not all(isinstance(body[k], Binary) and body[k].data for k in files):
        return False
    return BODY_SCHEMAS[operation].is_valid({**body, **{k: "a file" for k in files}})


@schema.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy:
    """Half the valid removal and score bodies, and every valid detect body, become a real_request. Invalid
    ones (negative cases) stay."""
    operation = context.operation.label
    if operation not in FILE_PARTS or not is_valid(operation, body):
        return st.just(body)
    if operation == "POST /v1/detect":
        # Its only part is the image, so random valid bytes are all this operation would get, and they can
        # start with an image signature (b"BM") and then be a corrupt image: a 400 no schema can rule out.
        return real_request(operation)
    return st.one_of(real_request(operation), st.just(body))


@pytest.fixture(scope="module")
def server(gated_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    # The tiny gated bundle plus the shipped overlay detector, so /v1/detect and maskless removals answer 200 too.
    from cleanplate.bundle import attach_detector, default_bundle_path
    from cleanplate.detector import Detector

    bundle = tmp_path_factory.mktemp("fuzz") / "gated_detector"
    shutil.copytree(gated_bundle, bundle)
    attach_detector(bundle, Detector.from_dir(default_bundle_path() / "detector"))
    with serve_in_thread(create_app(Settings(bundle=bundle, torch_threads=1, batch_window_ms=0))) as url:
        yield url


def test_fuzzed_document_is_the_served_one(server: str) -> None:
    assert httpx.get(server + "/openapi.json").json() == DOCUMENT
    assert sorted(f"{m.upper()} {p}" for p, item in DOCUMENT["paths"].items() for m in item) == sorted(OPERATIONS)


def test_uploads_are_declared_non_empty_files() -> None:
    """The endpoints answer a 0-byte upload 400 unreadable_image, so the schema must not call it valid."""
    bodies = DOCUMENT["components"]["schemas"]
    for body, fields in (("Body_remove_v1_remove_post", ("image", "mask")),
                         ("Body_detect_overlays_v1_detect_post", ("image",)),
                         ("Body_score_v1_score_post", ("source", "result", "mask"))):
        for field in fields:
            prop = bodies[body]["properties"][field]
            assert (prop["type"], prop["format"], prop["minLength"]) == ("string", "binary", 1), (body, field)


@schema.parametrize()
@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_api(case: schemathesis.Case, server: str) -> None:
    accept_json = case.operation.label == "POST /v1/remove" and next(ACCEPT_JSON)
    headers = {"Accept": "application/json"} if accept_json else None
    response = case.call_and_validate(base_url=server, headers=headers, checks=CHECKS, timeout=120)
    STATUSES[case.operation.label][response.status_code] += 1
    if case.operation.label == "POST /v1/remove" and response.status_code == 200:
        REMOVED_AS[response.headers["content-type"][0]] += 1


def test_every_operation_was_fuzzed(request: pytest.FixtureRequest) -> None:
    """Runs after test_api (file order): every operation got cases, undeclared methods were tried, removal
    and scoring were refused in each way (400, 415, 422) and also really ran (200), and removals came back
    both as an image and as JSON."""
    if not any(item.name.startswith("test_api") for item in request.session.items):
        pytest.skip("test_api was not selected")
    assert set(STATUSES) == set(OPERATIONS), dict(STATUSES)
    for operation, statuses in STATUSES.items():
        assert sum(statuses.values()) >= 5 and 405 in statuses, (operation, dict(statuses))
    for operation in ("POST /v1/remove", "POST /v1/detect", "POST /v1/score"):
        statuses = STATUSES[operation]
        assert {200, 400, 415, 422} <= statuses.keys() and statuses[200] >= 3, (operation, dict(statuses))
    assert "application/json" in REMOVED_AS and len(REMOVED_AS) >= 2, dict(REMOVED_AS)


def test_checks_catch_an_upload_schema_looser_than_the_endpoint(server: str) -> None:
    """Fuzzing the document with the image part's minLength taken out (as it was: a 0-byte image declared
    valid) fails, and on the server's 400 for the empty upload: the checks catch a schema looser than the
    endpoint."""
    loose = copy.deepcopy(DOCUMENT)
    del loose["components"]["schemas"]["Body_remove_v1_remove_post"]["properties"]["image"]["minLength"]
    operation = schemathesis.openapi.from_dict(loose, config=CONFIG)["/v1/remove"]["POST"]

    @given(case=operation.as_strategy())
    @settings(max_examples=300, deadline=None, derandomize=True, database=None)  # stops at the first failure
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=server, checks=[positive_data_acceptance], timeout=60)

    with pytest.raises(FailureGroup, match="Valid data should have been accepted") as failed:
        fuzz()
    assert [f.status_code for f in failed.value.exceptions] == [400]
