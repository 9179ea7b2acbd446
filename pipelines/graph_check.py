"""Check operator placement of the serialized DALI GPU graph, without CUDA.

DALI serializes a pipeline whose operators are placed on "mixed"/"gpu" even when the pipeline
itself has device_id=None (it only refuses to build or run it), so the GPU graph can be checked
on a CPU-only machine. The protobuf (dali_proto.PipelineDef, see DALI's dali.proto) is decoded
here from the wire format, as the wheel ships no Python bindings for it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch

from .recipes import LinearRecipe, TwoViewRecipe

# dali.proto field numbers
PIPE_OP, PIPE_OUTPUTS = 5, 7
OP_NAME, OP_INPUT, OP_OUTPUT, OP_ARGS, OP_INST = 1, 2, 3, 4, 5
IO_NAME, IO_DEVICE, IO_IS_ARG = 1, 2, 3
ARG_NAME, ARG_FLOATS, ARG_INTS, ARG_STRINGS, ARG_BOOLS, ARG_EXTRA, ARG_IS_VECTOR = 1, 3, 4, 5, 6, 7, 8


def _fields(buf: bytes) -> dict[int, list]:
    """Decode one protobuf message into {field number: [raw values]} (varint -> int, len -> bytes)."""
    out: dict[int, list] = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = struct.unpack("<f", buf[i : i + 4])[0], i + 4
        elif wire == 1:
            value, i = struct.unpack("<d", buf[i : i + 8])[0], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


@dataclass
class Port:
    name: str
    device: str
    is_argument: bool = False


@dataclass
class Op:
    kind: str  # DALI schema name, e.g. "decoders__Image", "CropMirrorNormalize"
    name: str  # instance name
    inputs: list[Port]
    outputs: list[Port]
    args: dict[str, object] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return str(self.args.get("device", self.outputs[0].device if self.outputs else "cpu"))


def _port(buf: bytes) -> Port:
    f = _fields(buf)
    return Port(f[IO_NAME][0].decode(), f[IO_DEVICE][0].decode(), bool(f.get(IO_IS_ARG, [0])[0]))


def _arg(buf: bytes) -> tuple[str, object]:
    f = _fields(buf)
    name = f[ARG_NAME][0].decode()
    if f.get(ARG_IS_VECTOR, [0])[0]:
        return name, [_arg(e)[1] for e in f.get(ARG_EXTRA, [])]
    for number, conv in ((ARG_STRINGS, bytes.decode), (ARG_INTS, int), (ARG_FLOATS, float), (ARG_BOOLS, bool)):
        if number in f:
            return name, conv(f[number][0])
    return name, None


def parse_pipeline(serialized: bytes) -> tuple[list[Op], list[Port]]:
    """Operators and pipeline outputs of a serialized DALI pipeline."""
    f = _fields(serialized)
    ops = []
    for raw in f.get(PIPE_OP, []):
        o = _fields(raw)
        ops.append(Op(o[OP_NAME][0].decode(), o.get(OP_INST, [b""])[0].decode(),
                      [_port(p) for p in o.get(OP_INPUT, [])], [_port(p) for p in o.get(OP_OUTPUT, [])],
                      dict(_arg(a) for a in o.get(OP_ARGS, []))))
    return ops, [_port(p) for p in f.get(PIPE_OUTPUTS, [])]


def check_gpu_graph(serialized: bytes, dtype: torch.dtype = torch.float32, n_outputs: int = 2,
                    n_labels: int = 0) -> list[str]:
    """Problems with a GPU graph (empty when fine): decoder on "mixed", every operator fed
    (transitively, through data inputs) by decoded images on "gpu", the first n_outputs - n_labels
    outputs from crop_mirror_normalize on the GPU in HWC and the DALI type for `dtype`; the last
    n_labels outputs (labels: two-view graphs have none, the labelled and eval graphs one) carry
    no image data and may stay on the CPU. Readers and the random / arithmetic operators that
    compute per-sample parameters (and peek_image_shape on the encoded bytes) may stay on the CPU."""
    from .dali_graph import output_dtype

    ops, outputs = parse_pipeline(serialized)
    problems = []
    decoders = [op for op in ops if op.kind.startswith("decoders__Image")]
    if len(decoders) != 1:
        return [f"expected one image decoder, found {len(decoders)}"]
    if decoders[0].device != "mixed":
        problems.append(f"decoder {decoders[0].name} runs on {decoders[0].device!r}, not 'mixed'")
    producer = {port.name: op for op in ops for port in op.outputs}
    image_data = {port.name for port in decoders[0].outputs}
    changed = True
    while changed:  # propagate "carries image data" along data (non-argument) inputs
        changed = False
        for op in ops:
            if any(p.name in image_data and not p.is_argument for p in op.inputs):
                new = {p.name for p in op.outputs} - image_data
                if new:
                    image_data |= new
                    changed = True
    for op in ops:
        fed = any(p.name in image_data and not p.is_argument for p in op.inputs)
        if fed and op.device != "gpu":
            problems.append(f"{op.kind} ({op.name}) handles decoded images on {op.device!r}, not 'gpu'")
        if any(p.name in image_data and p.is_argument for p in op.inputs):
            problems.append(f"{op.kind} ({op.name}) takes decoded images as an argument input")
    if len(outputs) != n_outputs:
        problems.append(f"expected {n_outputs} pipeline outputs, found {len(outputs)}")
    n_images = n_outputs - n_labels
    for port in outputs[n_images:]:
        if port.name in image_data:
            problems.append(f"label output {port.name} carries decoded image data")
    want = int(output_dtype(dtype))
    for port in outputs[:n_images]:
        op = producer.get(port.name)
        if port.device != "gpu":
            problems.append(f"output {port.name} is on {port.device!r}, not 'gpu'")
        if op is None or op.kind != "CropMirrorNormalize":
            problems.append(f"output {port.name} is not produced by crop_mirror_normalize")
            continue
        if op.args.get("output_layout") != "HWC":
            problems.append(f"output {port.name} has layout {op.args.get('output_layout')!r}, not 'HWC'")
        if op.args.get("dtype") != want:
            problems.append(f"output {port.name} has DALI dtype {op.args.get('dtype')}, not {want} for {dtype}")
    return problems


def serialize_two_view_gpu_graph(recipe: TwoViewRecipe, dtype: torch.dtype = torch.float32,
                                 batch_size: int = 8) -> bytes:
    """The GPU training graph of `recipe`, serialized without needing CUDA."""
    from .dali_graph import two_view_pipeline

    pipe = two_view_pipeline(["placeholder.jpg"], recipe, batch_size, device_id=None, gpu=True, dtype=dtype)
    return pipe.serialize()


def serialize_labelled_gpu_graph(recipe: LinearRecipe, dtype: torch.dtype = torch.float32,
                                 batch_size: int = 8) -> bytes:
    """The GPU graph of the labelled (linear-probe training) loader, serialized without CUDA;
    check it with n_outputs=2, n_labels=1."""
    from .dali_graph import FileReader, labelled_pipeline

    pipe = labelled_pipeline(FileReader(["placeholder.jpg"], [0]), recipe, batch_size, device_id=None, gpu=True,
                             dtype=dtype)
    return pipe.serialize()


def serialize_eval_gpu_graph(size: int, dtype: torch.dtype = torch.float32, batch_size: int = 8,
                             resize: int | None = None) -> bytes:
    """The GPU graph of the eval loader (resize, center crop), serialized without CUDA; check it
    with n_outputs=2, n_labels=1."""
    from .dali_graph import FileReader, eval_pipeline

    pipe = eval_pipeline(FileReader(["placeholder.jpg"], [0]), size, (0.5,) * 3, (0.25,) * 3, batch_size,
                         device_id=None, gpu=True, dtype=dtype, resize=resize)
    return pipe.serialize()
