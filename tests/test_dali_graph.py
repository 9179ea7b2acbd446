"""The GPU training graph, serialized without CUDA: decoder on "mixed", augmentations on "gpu"."""
import pytest
import torch

pytest.importorskip("nvidia.dali")

import nvidia.dali.fn as fn  # noqa: E402
import nvidia.dali.types as types  # noqa: E402
from nvidia.dali import pipeline_def  # noqa: E402

from fastmoco.pipelines import RECIPES, get_recipe  # noqa: E402
from fastmoco.pipelines.dali_graph import augment_view, decode, output_dtype  # noqa: E402
from fastmoco.pipelines.graph_check import check_gpu_graph, parse_pipeline, serialize_two_view_gpu_graph  # noqa: E402


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_graph_placement(name, dtype):
    serialized = serialize_two_view_gpu_graph(get_recipe(name), dtype)
    assert check_gpu_graph(serialized, dtype) == []
    ops, outputs = parse_pipeline(serialized)
    kinds = {op.kind for op in ops}
    assert {"readers__File", "decoders__Image", "RandomResizedCrop", "CropMirrorNormalize"} <= kinds
    assert ("GaussianBlur" in kinds) == (get_recipe(name).query.blur_p > 0)
    assert len(outputs) == 2 and all(p.device == "gpu" for p in outputs)


def test_cpu_graph_has_no_gpu_ops():
    from fastmoco.pipelines.dali_graph import two_view_pipeline

    ops, _ = parse_pipeline(two_view_pipeline(["x.jpg"], get_recipe("v3"), 4, device_id=None).serialize())
    assert {op.device for op in ops} == {"cpu"}


@pipeline_def(enable_conditionals=True)
def _bad_graph(how: str):
    encoded, _ = fn.readers.file(files=["x.jpg"], name="reader")
    view = get_recipe("v2").query
    if how == "cpu_decode":  # decode and augment on the CPU, copy only the result
        images = decode(encoded, gpu=False)
        return augment_view(images, view, types.FLOAT).gpu(), augment_view(images, view, types.FLOAT).gpu()
    images = decode(encoded, gpu=True)
    if how == "cpu_crop":  # one augmentation forced back to the CPU after the GPU decode
        q = augment_view(fn.random_resized_crop(images.cpu(), size=[224, 224]).gpu(), view, types.FLOAT)
        return q, augment_view(images, view, types.FLOAT)
    if how == "chw":
        q = fn.crop_mirror_normalize(fn.random_resized_crop(images, size=[224, 224]), output_layout="CHW")
        return q, augment_view(images, view, types.FLOAT)
    if how == "fp16":
        return augment_view(images, view, types.FLOAT16), augment_view(images, view, types.FLOAT16)
    raise ValueError(how)


@pytest.mark.parametrize("how,message", [("cpu_decode", "not 'mixed'"), ("cpu_crop", "not 'gpu'"),
                                         ("chw", "not 'HWC'"), ("fp16", "DALI dtype")])
def test_bad_graphs_fail_the_check(how, message):
    serialized = _bad_graph(how, batch_size=4, num_threads=1, device_id=None).serialize()
    problems = check_gpu_graph(serialized, torch.float32)
    assert any(message in p for p in problems), problems


def test_dtype_mapping():
    assert output_dtype(torch.float32) == types.FLOAT
    assert output_dtype(torch.float16) == output_dtype(torch.bfloat16) == types.FLOAT16
