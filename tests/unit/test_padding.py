"""Batch padding for accelerators (core.scoring): the sizes, and rows that copy the last real one."""

from __future__ import annotations

import numpy as np

from core.scoring import pad_rows, padded_sizes, provider_options


def test_padded_sizes_are_powers_of_two_from_8_and_the_largest_batch():
    assert padded_sizes(32) == (8, 16, 32)
    assert padded_sizes(100) == (8, 16, 32, 64, 100)
    assert padded_sizes(4) == (4,)


def test_rows_grow_to_the_next_size_with_copies_of_the_last_and_keep_the_first_ones():
    inputs = {"a": np.arange(10).reshape(5, 2), "b": np.arange(5, dtype=np.float32)}
    padded, rows = pad_rows(inputs, (8, 16))
    assert rows == 5 and {name: len(array) for name, array in padded.items()} == {"a": 8, "b": 8}
    np.testing.assert_array_equal(padded["a"][:5], inputs["a"])
    np.testing.assert_array_equal(padded["a"][5:], np.repeat(inputs["a"][-1:], 3, axis=0))
    assert padded["b"].dtype == np.float32
    same, rows = pad_rows({"a": np.zeros((8, 2))}, (8, 16))
    assert rows == 8 and len(same["a"]) == 8  # already a size
    beyond, rows = pad_rows({"a": np.zeros((20, 2))}, (8, 16))
    assert rows == 20 and len(beyond["a"]) == 20  # larger than every size: left as it is
    nothing, rows = pad_rows({"a": np.zeros((3, 2))}, ())
    assert rows == 3 and len(nothing["a"]) == 3


def test_provider_options_set_the_cuda_search_and_the_tensorrt_cache():
    options = dict(
        provider_options(
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], cache_dir="/cache"
        )
    )
    assert options["CUDAExecutionProvider"]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert options["TensorrtExecutionProvider"]["trt_engine_cache_path"] == "/cache"
    assert options["TensorrtExecutionProvider"]["trt_fp16_enable"] == "False"  # never on an fp32 graph
    assert options["CPUExecutionProvider"] == {}
    half = dict(provider_options(["TensorrtExecutionProvider"], fp16=True))
    assert half["TensorrtExecutionProvider"]["trt_fp16_enable"] == "True"  # the checked fp16 graph
