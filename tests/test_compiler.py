"""The compiler's manifest: the initialisation rule of each layer comes from its activation's op table entry."""

from __future__ import annotations

from tests.reference import DILATED, SMOOTH, build


def schemes(text: str) -> dict[str, str]:
    return {p["layer"]: p["init"]["scheme"] for p in build(text).manifest["params"]}


def test_layers_feeding_relu_like_activations_get_he_init_the_others_lecun():
    # gelu, silu and elu are ReLU-like (fused or not); the last dense layer feeds nothing
    assert schemes(SMOOTH) == {"a": "he", "b": "he", "g": "he", "f.1": "he", "f.2": "he", "f.3": "lecun"}
    assert schemes(DILATED) == {"a": "he", "b": "lecun", "c": "he", "o": "lecun"}
