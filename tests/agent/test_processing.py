"""Pre- and postprocessing kinds on real images rendered with OpenCV and hand-built outputs."""

from __future__ import annotations

import struct
from typing import Any

import cv2
import numpy as np
import pytest

from agent.errors import BadInput, BundleError, InferenceError
from agent.processing import (
    POSTPROCESSORS,
    ClassificationPostprocessing,
    DetectionPostprocessing,
    ImageMeta,
    ImagePreprocessing,
    RawPostprocessing,
    build_postprocessor,
    build_preprocessor,
)
from agent.processing.image import ImagePreprocessor, encoded_size

Array = np.ndarray[Any, Any]
RED_BGR = (0, 0, 255)
BLUE_BGR = (255, 0, 0)


def image_cfg(**kw: Any) -> ImagePreprocessing:
    return ImagePreprocessing.model_validate({"kind": "image", **kw})


def two_colours(width: int = 40, height: int = 20) -> Array:
    """Left half red, right half blue (BGR, uint8)."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, : width // 2] = RED_BGR
    img[:, width // 2 :] = BLUE_BGR
    return img


def png(img: Array) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return bytes(buf.tobytes())


# --- image preprocessing -----------------------------------------------------------------


def test_stretch_rgb_nchw_exact_values() -> None:
    pre = build_preprocessor(image_cfg(width=20, height=10, scale=1 / 255))
    tensor, meta = pre(png(two_colours()))
    assert tensor.shape == (1, 3, 10, 20) and tensor.dtype == np.float32
    assert tensor.flags.c_contiguous
    # Halving 40 -> 20 with bilinear sampling lands on exact source pixel pairs.
    np.testing.assert_allclose(tensor[0, :, :, :10].reshape(3, -1).T, [[1, 0, 0]] * 100, atol=1e-6)
    np.testing.assert_allclose(tensor[0, :, :, 10:].reshape(3, -1).T, [[0, 0, 1]] * 100, atol=1e-6)
    assert meta == ImageMeta(40, 20, 20, 10, 0.5, 0.5)


def test_bgr_nhwc_with_mean_and_std() -> None:
    cfg = image_cfg(
        width=40, height=20, color="bgr", layout="nhwc", scale=1 / 255,
        mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 1.0],
    )  # fmt: skip
    tensor, _ = build_preprocessor(cfg)(png(two_colours()))
    assert tensor.shape == (1, 20, 40, 3)
    # red is B=0, G=0, R=1 -> ((0-.5)/.5, (0-.25)/.25, (1-0)/1)
    np.testing.assert_allclose(tensor[0, 5, 3], [-1.0, -1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(tensor[0, 5, 30], [1.0, -1.0, 0.0], atol=1e-6)


def test_uint8_int8_and_float16_outputs() -> None:
    raw, _ = build_preprocessor(image_cfg(width=40, height=20, dtype="uint8"))(png(two_colours()))
    assert raw.dtype == np.uint8
    assert raw[0, :, 0, 0].tolist() == [255, 0, 0]  # RGB, NCHW
    signed, _ = build_preprocessor(image_cfg(width=40, height=20, dtype="int8", mean=128))(
        png(two_colours())
    )
    assert signed.dtype == np.int8
    assert signed[0, :, 0, 0].tolist() == [127, -128, -128]
    half, _ = build_preprocessor(image_cfg(width=40, height=20, dtype="float16", scale=0.5))(
        png(two_colours())
    )
    assert half.dtype == np.float16
    assert half[0, :, 0, 0].tolist() == [127.5, 0.0, 0.0]


def test_letterbox_geometry_and_padding() -> None:
    pre = build_preprocessor(image_cfg(width=32, height=32, resize="letterbox", dtype="uint8"))
    tensor, meta = pre(png(two_colours(40, 20)))
    # 40x20 scaled by 0.8 -> 32x16, centred: 8 rows of padding above and below.
    assert meta == ImageMeta(40, 20, 32, 32, 0.8, 0.8, 0.0, 8.0)
    rgb = tensor[0].transpose(1, 2, 0)
    assert (rgb[:8] == 114).all() and (rgb[24:] == 114).all()
    assert (rgb[8:24, :15] == [255, 0, 0]).all()
    assert (rgb[8:24, 17:] == [0, 0, 255]).all()
    # A point of the original goes to the model input and back.
    back = meta.to_original(np.array([[30 * 0.8, 10 * 0.8 + 8, 40 * 0.8, 20 * 0.8 + 8]]))
    np.testing.assert_allclose(back, [[30, 10, 40, 20]], atol=1e-5)


def test_letterbox_odd_padding_and_custom_pad_value() -> None:
    cfg = image_cfg(width=16, height=16, resize="letterbox", pad_value=0, dtype="uint8")
    tensor, meta = build_preprocessor(cfg)(np.full((10, 30, 3), 200, np.uint8))
    # 30x10 -> 16x5 (ratio 16/30), 11 rows of padding: 5 above, 6 below.
    assert (meta.pad_x, meta.pad_y) == (0.0, 5.0)
    assert meta.scale_x == pytest.approx(16 / 30) and meta.scale_y == pytest.approx(5 / 10)
    rows = tensor[0, 0, :, 8]
    assert rows.tolist() == [0] * 5 + [200] * 5 + [0] * 6


def test_tall_image_pads_left_and_right() -> None:
    cfg = image_cfg(width=20, height=20, resize="letterbox", dtype="uint8", layout="nhwc")
    tensor, meta = build_preprocessor(cfg)(np.full((40, 10, 3), 9, np.uint8))
    # 10x40 -> 5x20; 15 columns of padding: 7 left, 8 right.
    assert (meta.pad_x, meta.pad_y, meta.scale_x) == (7.0, 0.0, 0.5)
    assert tensor[0, 10, :, 0].tolist() == [114] * 7 + [9] * 5 + [114] * 8


def test_grayscale_and_alpha_images() -> None:
    pre = build_preprocessor(image_cfg(width=8, height=8, dtype="uint8"))
    gray, _ = pre(png(np.full((8, 8), 100, np.uint8)))
    assert gray.shape == (1, 3, 8, 8) and (gray == 100).all()
    bgra = np.zeros((8, 8, 4), np.uint8)
    bgra[..., :3] = RED_BGR
    bgra[:, :4, 3] = 0  # half transparent: the colour is kept, alpha dropped
    bgra[:, 4:, 3] = 255
    for source in (png(bgra), bgra):
        rgb, _ = pre(source)
        assert (rgb[0, 0] == 255).all() and (rgb[0, 1:] == 0).all()


def test_gray_model_input() -> None:
    pre = build_preprocessor(image_cfg(width=40, height=20, color="gray", dtype="uint8"))
    tensor, _ = pre(png(two_colours()))
    assert tensor.shape == (1, 1, 20, 40)
    # OpenCV's luma: 0.299 R + 0.587 G + 0.114 B
    assert tensor[0, 0, 0, 0] == 76 and tensor[0, 0, 0, 39] == 29
    from_array, _ = pre(two_colours())
    np.testing.assert_array_equal(from_array, tensor)


def test_array_input_matches_encoded_input() -> None:
    pre = build_preprocessor(image_cfg(width=24, height=24, resize="letterbox", scale=1 / 255))
    a, meta_a = pre(two_colours())
    b, meta_b = pre(png(two_colours()))
    np.testing.assert_array_equal(a, b)
    assert meta_a == meta_b


def test_jpeg_header_size_and_decode() -> None:
    img = two_colours(37, 23)
    for flags in ([], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]):
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95, *flags])
        assert ok
        assert encoded_size(buf.tobytes()) == (37, 23)
    tensor, meta = build_preprocessor(image_cfg(width=37, height=23, dtype="uint8"))(buf.tobytes())
    assert (meta.original_width, meta.original_height) == (37, 23)
    assert abs(int(tensor[0, 0, 10, 3]) - 255) <= 3 and int(tensor[0, 2, 10, 3]) <= 3


@pytest.mark.parametrize(
    "payload",
    [b"not an image", b"", png(two_colours())[:40], b"\xff\xd8\xff\xe0\x00\x10JFIF\x00garbage"],
)
def test_undecodable_images_are_bad_input(payload: bytes) -> None:
    with pytest.raises(BadInput, match="image does not decode") as err:
        build_preprocessor(image_cfg(width=8, height=8))(payload)
    assert err.value.code == "bad_input"


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    data = bytearray(png(two_colours()))
    struct.pack_into(">II", data, 16, 100_000, 100_000)  # a forged IHDR: 10 gigapixels
    with pytest.raises(BadInput, match="100000x100000, over the limit"):
        build_preprocessor(image_cfg(width=8, height=8))(bytes(data))
    small = ImagePreprocessor(image_cfg(width=8, height=8), max_pixels=799)
    with pytest.raises(BadInput, match="40x20"):
        small(png(two_colours()))
    with pytest.raises(BadInput, match="40x20"):
        small(two_colours())


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4, 3), np.float32), "must be uint8"),
        (np.zeros((4, 4, 2), np.uint8), "HxWx3"),
        (np.zeros((4,), np.uint8), "HxWx3"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ],
)
def test_bad_arrays_are_bad_input(array: Array, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        build_preprocessor(image_cfg(width=8, height=8))(array)


# --- classification ------------------------------------------------------------------------


def classification(**kw: Any) -> ClassificationPostprocessing:
    return ClassificationPostprocessing.model_validate({"kind": "classification", **kw})


def test_classification_top_k_with_labels() -> None:
    post = build_postprocessor(classification(top_k=3), ["a", "b", "c", "d"])
    result = post({"probs": np.array([[0.1, 0.5, 0.2, 0.2]], np.float32)}, None)
    assert result == {
        "classes": [
            {"label": "b", "index": 1, "score": 0.5},
            {"label": "c", "index": 2, "score": 0.2},  # tie: lower index first
            {"label": "d", "index": 3, "score": 0.2},
        ]
    }


def test_classification_softmax_and_no_labels() -> None:
    logits = np.array([1.0, 3.0, 2.0], np.float32).reshape(1, 3, 1, 1)
    post = build_postprocessor(classification(top_k=5, softmax=True), None)
    result = post({"logits": logits}, None)
    assert result is not None
    e = np.exp([1.0, 3.0, 2.0])
    p = e / e.sum()
    assert [c["index"] for c in result["classes"]] == [1, 2, 0]
    assert [c["label"] for c in result["classes"]] == [None, None, None]
    assert [c["score"] for c in result["classes"]] == [round(float(p[i]), 6) for i in (1, 2, 0)]


def test_classification_picks_the_named_output() -> None:
    post = build_postprocessor(classification(top_k=1, output="b"), None)
    outputs = {"a": np.array([[9.0, 0.0]]), "b": np.array([[0.0, 9.0]])}
    assert post(outputs, None) == {"classes": [{"label": None, "index": 1, "score": 9.0}]}
    with pytest.raises(InferenceError, match="has 2 outputs"):
        build_postprocessor(classification(), None)(outputs, None)
    with pytest.raises(InferenceError, match="no output 'c'"):
        build_postprocessor(classification(output="c"), None)(outputs, None)


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        (np.zeros((2, 3)), None, r"one score vector, got shape \[2, 3\]"),
        (np.zeros((1, 3)), ["a", "b"], "3 classes but the bundle has 2 labels"),
        (np.array([[0.1, np.nan]]), None, "NaN or Inf"),
    ],
)
def test_classification_rejects_bad_outputs(
    scores: Array, labels: list[str] | None, message: str
) -> None:
    with pytest.raises(InferenceError, match=message):
        build_postprocessor(classification(), labels)({"y": scores}, None)


# --- detection -----------------------------------------------------------------------------


def detection(**kw: Any) -> DetectionPostprocessing:
    return DetectionPostprocessing.model_validate({"kind": "detection", **kw})


def v8_output(rows: list[list[float]]) -> Array:
    """YOLOv8 layout: ``[1, 4 + C, N]`` from rows ``[cx, cy, w, h, class scores...]``."""
    return np.array(rows, np.float32).T[None]


ROWS = [
    [50, 50, 20, 20, 0.9, 0.0],  # class 0, best
    [52, 50, 20, 20, 0.8, 0.0],  # class 0, overlaps the best (IoU 0.82): suppressed
    [52, 50, 20, 20, 0.0, 0.7],  # same place, class 1: kept unless class-agnostic
    [150, 100, 40, 20, 0.1, 0.6],  # class 1 elsewhere
    [10, 10, 5, 5, 0.2, 0.1],  # under the threshold
]


def test_detection_decode_and_class_aware_nms() -> None:
    post = build_postprocessor(detection(transposed=True), ["cat", "dog"])
    result = post({"output0": v8_output(ROWS)}, None)
    assert result == {
        "detections": [
            {"label": "cat", "class_id": 0, "score": 0.9, "box": [40.0, 40.0, 60.0, 60.0]},
            {"label": "dog", "class_id": 1, "score": 0.7, "box": [42.0, 40.0, 62.0, 60.0]},
            {"label": "dog", "class_id": 1, "score": 0.6, "box": [130.0, 90.0, 170.0, 110.0]},
        ]
    }


def test_detection_class_agnostic_and_max_detections() -> None:
    agnostic = build_postprocessor(detection(transposed=True, class_agnostic=True), None)
    result = agnostic({"y": v8_output(ROWS)}, None)
    assert result is not None
    assert [(d["class_id"], d["score"]) for d in result["detections"]] == [(0, 0.9), (1, 0.6)]
    assert result["detections"][0]["label"] is None
    top1 = build_postprocessor(detection(transposed=True, max_detections=1), None)
    only = top1({"y": v8_output(ROWS)}, None)
    assert only is not None and [d["score"] for d in only["detections"]] == [0.9]


def test_yolov5_rows_with_objectness() -> None:
    rows = np.array(
        [
            [20, 20, 10, 10, 0.5, 0.9, 0.1],  # 0.45: under 0.5
            [80, 80, 10, 10, 0.9, 0.2, 0.6],  # 0.54, class 1
            [82, 80, 10, 10, 0.95, 0.2, 0.55],  # 0.5225, class 1, overlaps: suppressed
        ],
        np.float32,
    )[None]
    post = build_postprocessor(detection(objectness=True, score_threshold=0.5), None)
    result = post({"y": rows}, None)
    assert result is not None
    assert [(d["class_id"], d["score"], d["box"]) for d in result["detections"]] == [
        (1, 0.54, [75.0, 75.0, 85.0, 85.0])
    ]


def test_xyxy_and_normalized_boxes() -> None:
    rows = np.array([[0.25, 0.5, 0.75, 1.0, 0.8]], np.float32)
    cfg = detection(box_format="xyxy", normalized_boxes=True)
    meta = ImageMeta(200, 100, 100, 100, 0.5, 0.5, 0.0, 25.0)
    result = build_postprocessor(cfg, None)({"y": rows}, meta)
    assert result is not None
    # normalized -> input pixels [25, 50, 75, 100] -> original [50, 50, 150, 150] clipped to 100
    assert result["detections"][0]["box"] == [50.0, 50.0, 150.0, 100.0]
    no_meta = build_postprocessor(cfg, None)({"y": rows}, None)
    assert no_meta is not None and no_meta["detections"][0]["box"] == [0.25, 0.5, 0.75, 1.0]


def test_boxes_map_back_through_letterbox_and_stretch() -> None:
    original = np.zeros((200, 400, 3), np.uint8)
    cv2.rectangle(original, (100, 50), (199, 149), (255, 255, 255), thickness=-1)
    encoded = png(original)
    for resize in ("letterbox", "stretch"):
        pre = build_preprocessor(image_cfg(width=200, height=200, resize=resize, color="gray"))
        tensor, meta = pre(encoded)
        # Find the rectangle in the model input and report it as a model would.
        ys, xs = np.nonzero(tensor[0, 0] > 127)
        x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        row = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, 0.95]
        post = build_postprocessor(detection(), ["box"])
        result = post({"y": np.array([row], np.float32)}, meta)
        assert result is not None
        np.testing.assert_allclose(result["detections"][0]["box"], [100, 50, 200, 150], atol=1.0)


def test_detection_drops_non_finite_and_handles_empty() -> None:
    post = build_postprocessor(detection(), None)
    rows = np.array([[np.nan, 5, 2, 2, 0.9], [5, 5, 2, 2, np.nan], [5, 5, 2, 2, 0.1]], np.float32)
    assert post({"y": rows}, None) == {"detections": []}
    assert post({"y": np.zeros((1, 0, 6), np.float32)}, None) == {"detections": []}


@pytest.mark.parametrize(
    ("output", "cfg", "labels", "message"),
    [
        (np.zeros((2, 5, 6)), {}, None, r"batch 1, got shape \[2, 5, 6\]"),
        (np.zeros((1, 5, 4)), {}, None, "leave no class scores"),
        (np.zeros((1, 5, 5)), {"objectness": True}, None, "leave no class scores"),
        (np.zeros((5,)), {}, None, "2-D or 3-D"),
        (np.zeros((1, 5, 7)), {}, ["a", "b"], "3 classes but the bundle has 2 labels"),
    ],
)
def test_detection_rejects_bad_outputs(
    output: Array, cfg: dict[str, Any], labels: list[str] | None, message: str
) -> None:
    with pytest.raises(InferenceError, match=message):
        build_postprocessor(detection(**cfg), labels)({"y": output}, None)


def reference_nms(boxes: Array, scores: Array, classes: Array, iou: float) -> list[int]:
    """Greedy per-class NMS, one candidate at a time: the definition the fast path must meet."""
    keep: list[int] = []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in np.argsort(-scores, kind="stable"):
        kept = np.array([j for j in keep if classes[j] == classes[i]], dtype=np.int64)
        if kept.size:
            ix = np.minimum(boxes[i, 2], boxes[kept, 2]) - np.maximum(boxes[i, 0], boxes[kept, 0])
            iy = np.minimum(boxes[i, 3], boxes[kept, 3]) - np.maximum(boxes[i, 1], boxes[kept, 1])
            inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
            if (inter / (area[i] + area[kept] - inter) > iou).any():
                continue
        keep.append(int(i))
    return keep


def test_detection_matches_a_reference_on_many_random_anchors() -> None:
    rng = np.random.default_rng(7)
    n, classes = 2000, 4
    centres = rng.uniform(0, 320, (n, 2))
    sizes = rng.uniform(8, 60, (n, 2))
    scores = rng.uniform(0, 1, (n, classes)) ** 3
    rows = np.concatenate([centres, sizes, scores], axis=1).astype(np.float32)
    cfg = dict(transposed=True, score_threshold=0.3, iou_threshold=0.5)
    result = build_postprocessor(detection(**cfg, max_detections=10000), None)(
        {"y": rows.T[None]}, None
    )
    capped = build_postprocessor(detection(**cfg, max_detections=100), None)(
        {"y": rows.T[None]}, None
    )
    assert result is not None and capped is not None
    best = scores.astype(np.float32).argmax(1)
    best_score = scores.astype(np.float32).max(1)
    mask = best_score >= 0.3
    xyxy = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1).astype(np.float32)
    idx = np.nonzero(mask)[0]
    keep = idx[reference_nms(xyxy[idx], best_score[idx], best[idx], 0.5)]
    got = [(d["class_id"], d["score"]) for d in result["detections"]]
    want = [(int(best[k]), round(float(best_score[k]), 6)) for k in keep]
    assert len(want) > 500
    assert got == want
    # The cap keeps the best detections NMS kept (not the best candidates before NMS).
    assert [(d["class_id"], d["score"]) for d in capped["detections"]] == want[:100]


# --- registries ---------------------------------------------------------------------------


def test_raw_postprocessing_gives_no_result() -> None:
    outputs = {"y": np.ones((1, 2), np.float32)}
    assert build_postprocessor(None)(outputs, None) is None
    assert build_postprocessor(RawPostprocessing(kind="raw"))(outputs, None) is None


def test_unknown_kind_is_a_bundle_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(POSTPROCESSORS, "detection")
    with pytest.raises(BundleError, match="unknown kind 'detection'"):
        build_postprocessor(detection())
