"""The GPU training graph, serialized without CUDA: decoder on "mixed", augmentations on "gpu"."""
import pytest
import torch

pytest.importorskip("nvidia.dali")

import nvidia.dali.fn as fn  # noqa: E402
import nvidia.dali.types as types  # noqa: E402
from fastmoco.pipelines import LINEAR_RECIPES, RECIPES, get_linear_recipe, get_recipe  # noqa: E402
from fastmoco.pipelines.dali_graph import augment_view, decode, output_dtype  # noqa: E402
from fastmoco.pipelines.graph_check import (  # noqa: E402
    check_gpu_graph,
    parse_pipeline,
    serialize_eval_gpu_graph,
    serialize_labelled_gpu_graph,
    serialize_two_view_gpu_graph,
)
from nvidia.dali import pipeline_def  # noqa: E402


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


@pytest.mark.parametrize("name", ["cifar", "v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_labelled_gpu_graph_placement(name, dtype):
    """The linear probe's training graph: view on the GPU, labels from the reader on the CPU."""
    recipe = get_linear_recipe(name)
    serialized = serialize_labelled_gpu_graph(recipe, dtype)
    assert check_gpu_graph(serialized, dtype, n_outputs=2, n_labels=1) == []
    assert check_gpu_graph(serialized, dtype) != []  # not two images
    ops, outputs = parse_pipeline(serialized)
    kinds = {op.kind for op in ops}
    assert {"readers__File", "decoders__Image", "CropMirrorNormalize"} <= kinds
    if recipe.kind == "pad_crop":
        assert {"PeekImageShape", "Slice"} <= kinds and "RandomResizedCrop" not in kinds
        assert next(op for op in ops if op.kind == "Slice").device == "gpu"
    else:
        assert "RandomResizedCrop" in kinds and "Slice" not in kinds
    assert not kinds & {"ColorTwist", "GaussianBlur"}  # no colour augmentation in the linear protocol
    assert [p.device for p in outputs] == ["gpu", "cpu"]


def test_labelled_cpu_graph_has_no_gpu_ops():
    from fastmoco.pipelines.dali_graph import FileReader, labelled_pipeline

    for recipe in LINEAR_RECIPES.values():
        pipe = labelled_pipeline(FileReader(["x.jpg"], [0]), recipe, 4, device_id=None)
        assert {op.device for op in parse_pipeline(pipe.serialize())[0]} == {"cpu"}


@pytest.mark.parametrize("size,resize", [(224, None), (32, None), (96, 110)])
def test_eval_gpu_graph_placement(size, resize):
    """Eval: resize and the center window on the GPU; their integer sizes and corner on the CPU."""
    serialized = serialize_eval_gpu_graph(size, resize=resize)
    assert check_gpu_graph(serialized, torch.float32, n_outputs=2, n_labels=1) == []
    ops, outputs = parse_pipeline(serialized)
    (rs,) = [op for op in ops if op.kind == "Resize"]
    (sl,) = [op for op in ops if op.kind == "Slice"]
    assert rs.device == sl.device == "gpu" and sl.args["shape"] == [size, size]
    assert "PeekImageShape" in {op.kind for op in ops} and [p.device for p in outputs] == ["gpu", "cpu"]


@pipeline_def(enable_conditionals=True)
def _label_carries_images():
    encoded, _ = fn.readers.file(files=["x.jpg"], name="reader")
    images = decode(encoded, gpu=True)
    return augment_view(images, get_recipe("v2").query, types.FLOAT), fn.crop(images, crop=[8, 8])


def test_label_output_with_images_fails_the_check():
    serialized = _label_carries_images(batch_size=4, num_threads=1, device_id=None).serialize()
    problems = check_gpu_graph(serialized, torch.float32, n_outputs=2, n_labels=1)
    assert any("label output" in p for p in problems), problems


def test_dtype_mapping():
    assert output_dtype(torch.float32) == types.FLOAT
    assert output_dtype(torch.float16) == output_dtype(torch.bfloat16) == types.FLOAT16
