"""Inference precisions: fp32, bf16 (PyTorch autocast) and int8 (onnxruntime static QDQ quantization with
per-channel weights, calibrated on training photos); the instruction sets this CPU has; the measured choice
of a model (``fashionkp precision``), recorded beside its checkpoint and used by ``precision=auto``."""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fashionkp.data.fashionai import read_splits
from fashionkp.data.images import load_image
from fashionkp.data.keypoints import CATEGORY_ID
from fashionkp.data.split import split_records
from fashionkp.data.transforms import letterbox
from fashionkp.errors import ConfigError

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16", "int8")
#: What ``precision=`` accepts: ``auto`` is the measured choice of each model (fp32 where none was measured).
PRECISION_CHOICES = ("auto", *PRECISIONS)
#: The NE cost (points) a faster precision may have against fp32 to be chosen by ``precision=auto``.
NE_TOLERANCE = 0.1
#: Version of what int8 leaves in fp32 (``fp32_nodes``); int8 files and records of another version are made
#: again. 2: the padding arithmetic stays fp32 (1, unversioned: only the type head did).
INT8_SCHEME = 2


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction sets that matter for bf16 and int8 inference."""

    flags: frozenset[str]

    @property
    def bf16(self) -> bool:
        """Native bf16 dot products (AVX-512 BF16 or AMX): bf16 is faster than fp32 only with them."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def vnni(self) -> bool:
        """int8 dot products (AVX-512 VNNI, AVX-VNNI or AMX): without them int8 runs, but slower."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    def describe(self) -> str:
        simd = "AVX-512" if "avx512f" in self.flags else "AVX2" if "avx2" in self.flags else "no AVX2"
        return f"{simd}, bf16 {'yes' if self.bf16 else 'no'}, VNNI {'yes' if self.vnni else 'no'}"


@cache
def cpu_features() -> CpuFeatures:
    """This machine's CPU flags (from /proc/cpuinfo on Linux; none elsewhere, which means fp32)."""
    flags: set[str] = set()
    if platform.system() == "Linux" and Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    return CpuFeatures(frozenset(flags))


def usable(precision: str, device_type: str, features: CpuFeatures | None = None) -> str:
    """``precision`` where this device can run it faster than fp32, else fp32, with a log line that says why."""
    if precision not in PRECISIONS:
        raise ConfigError("precision", precision, "not a valid choice", PRECISION_CHOICES)
    if device_type != "cpu":
        if precision == "int8":
            log.warning("precision=int8 runs on the CPU (onnxruntime) only: fp32 on %s", device_type)
            return "fp32"
        return precision
    features = features or cpu_features()
    if precision == "bf16" and not features.bf16:
        log.warning("precision=bf16: this CPU (%s) has no AVX-512 BF16 or AMX, so fp32 instead", features.describe())
        return "fp32"
    if precision == "int8" and not features.vnni:
        log.warning("precision=int8: this CPU (%s) has no VNNI; int8 runs, but may be slower than fp32",
                    features.describe())  # fmt: skip
    return precision


def runs_on_cpu(accelerator: str) -> bool:
    """Whether Lightning's ``trainer.accelerator`` puts the run on the CPU ("auto" does without CUDA)."""
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def training_precision(precision: str, accelerator: str, features: CpuFeatures | None = None) -> str:
    """Lightning's ``trainer.precision`` for a run on ``accelerator``: bf16 on a CPU without AVX-512 BF16 or AMX
    (where autocast only emulates it, slower than fp32) becomes 32-true, with a log line that says why."""
    if not (runs_on_cpu(accelerator) and str(precision).startswith("bf16")):
        return precision
    features = features or cpu_features()
    if features.bf16:
        return precision
    log.warning("trainer.precision=%s: this CPU (%s) has no AVX-512 BF16 or AMX, so 32-true instead",
                precision, features.describe())  # fmt: skip
    return "32-true"


@cache
def onnxruntime_bf16_error() -> str | None:
    """Why onnxruntime's CPU provider cannot run a bf16 convolution (None where it can): fashionkp then runs bf16
    through PyTorch autocast only. Asked of the installed onnxruntime with a one-node model, not assumed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    from onnx import TensorProto, helper

    def bf16(name: str, side: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.BFLOAT16, [1, 1, side, side])

    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    graph = helper.make_graph([conv], "bf16_conv", [bf16("x", 4), bf16("w", 3)], [bf16("y", 2)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own classes, whose names differ between versions
        detail = str(e).splitlines()[0].rsplit("failed:", 1)[-1].strip()  # after the model path, where one is named
        return f"onnxruntime {ort.__version__} refuses a bf16 convolution on CPU: {detail}"
    return None


def describe_choice(record: dict, precision: str | None = None) -> str:
    """One line on a measured choice: ``precision`` (the record's choice unless told) against fp32."""
    precision = precision or record["choice"]
    chosen, fp32 = record["figures"][precision], record["figures"]["fp32"]
    return (
        f"{precision}, measured on {record['validation_images']} validation photos: NE {chosen['ne']:.2f}% vs fp32 "
        f"{fp32['ne']:.2f}%, {chosen['ms_per_image']:.1f} vs {fp32['ms_per_image']:.1f} ms/image ({record['cpu']})"
    )


def onnx_choice(record: dict) -> str:
    """The fastest precision of a record that an ONNX file can hold (fp32 or int8; bf16 runs only through
    PyTorch autocast) within the record's NE tolerance of fp32."""
    figures = {p: f for p, f in record["figures"].items() if p != "bf16"}
    return choose(figures, record.get("tolerance_points", NE_TOLERANCE))


def stamp_onnx(path: Path | str, out: Path | str, **fields: object) -> Path:
    """A copy of an exported ONNX file at ``out`` (written atomically) whose fashionkp metadata gains ``fields``."""
    import onnx

    model = onnx.load(str(path))
    set_info(model, {**read_info(model), **fields})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def read_info(model: onnx.ModelProto) -> dict:
    """What fashionkp wrote into an ONNX file (input size, codec, precision, ...); {} for another exporter's file."""
    meta = {p.key: p.value for p in model.metadata_props}
    return json.loads(meta["fashionkp"]) if "fashionkp" in meta else {}


def set_info(model: onnx.ModelProto, info: dict) -> None:
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "fashionkp", json.dumps(info)


def letterboxed(path: Path | str, size: int) -> np.ndarray:
    """(1, 3, size, size) float32 network input of a photo, as the predictor makes it."""
    return letterbox(load_image(path), size).transpose(2, 0, 1)[None].astype(np.float32)


def type_head_nodes(graph: onnx.GraphProto) -> list[str]:
    """The garment-type head's nodes: int8 leaves them in fp32 (one small layer, no time to win, and its
    answer picks the points)."""
    return [n.name for n in graph.node if "type_head" in n.name or n.op_type == "Softmax"]


def type_input_nodes(graph: onnx.GraphProto) -> list[str]:
    """The nodes that turn the garment-type input into scales and shifts (those whose inputs are the types, what
    derives from them alone, and constants): quantized together, one type's small values would round to another's."""
    static = {i.name for i in graph.initializer} | {o for n in graph.node if not n.input for o in n.output}
    derived, names = {"types"}, []
    for node in graph.node:  # ONNX lists nodes in the order they run
        inputs = [i for i in node.input if i]
        if any(i in derived for i in inputs) and all(i in derived or i in static for i in inputs):
            derived.update(node.output)
            names.append(node.name)
    return names


def fp32_nodes(graph: onnx.GraphProto) -> list[str]:
    """The nodes int8 leaves in fp32: the type head, the garment-type input's arithmetic, and the arithmetic that
    computes padding amounts from shapes (TF-style "same" padding of the EfficientNet backbones). Quantized, those
    amounts round to the wrong whole pixels and shift feature maps: on the recipe's model that moved the median
    point by 3.4 input pixels, 0.2 with it in fp32, and cost 2.1 NE points (benchmarks/bench_int8_layers.py).
    """
    producer = {out: node for node in graph.node for out in node.output}
    shape_math: dict[int, str] = {}
    pending = [name for node in graph.node if node.op_type == "Pad" for name in node.input[1:]]
    while pending:
        node = producer.get(pending.pop())
        if node is None or id(node) in shape_math:
            continue
        shape_math[id(node)] = node.name
        if node.op_type != "Shape":  # a Shape reads the feature map only for its size: stop there
            pending.extend(node.input)
    return sorted(set(shape_math.values()) | set(type_head_nodes(graph)) | set(type_input_nodes(graph)))


def quantize_int8(
    fp32_onnx: Path | str,
    out: Path | str,
    photos: Sequence[Path | str],
    keep_fp32: Callable[[onnx.GraphProto], list[str]] = fp32_nodes,
) -> Path:
    """Static int8 quantization of an exported model (QDQ, per-channel int8 weights, uint8 activations), its
    activation ranges calibrated on ``photos`` letterboxed at the model's input size (from the export's metadata);
    the nodes ``keep_fp32`` names stay fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not photos:
        raise ConfigError("calibration_root", None, "int8 needs calibration photos (training photos of the model)")
    proto = onnx.load(str(fp32_onnx))
    info = read_info(proto)
    input_size = info["input_size"]
    takes_types = "types" in [i.name for i in proto.graph.input]
    if takes_types and any(Path(p).parent.name not in CATEGORY_ID for p in photos):
        log.warning("int8: calibration photos outside a FashionAI type folder (Images/<type>/) are told blouse")

    def feed(photo: Path | str) -> dict:
        inputs = {"images": letterboxed(photo, input_size)}
        if takes_types:  # the photo's type, from its FashionAI folder
            inputs["types"] = np.array([CATEGORY_ID.get(Path(photo).parent.name, 0)], dtype=np.int64)
        return inputs

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[dict] = (feed(p) for p in photos)

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prepared = out.with_name(f".{out.stem}.{os.getpid()}.prepared.onnx")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(tmp), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=keep_fp32(onnx.load(str(prepared)).graph),
        )  # fmt: skip
        model = onnx.load(str(tmp))
        info.update(precision="int8", calibration_photos=len(photos), int8_scheme=INT8_SCHEME)
        set_info(model, info)
        onnx.save(model, str(tmp))
        os.replace(tmp, out)
    finally:
        for leftover in (prepared, tmp):
            leftover.unlink(missing_ok=True)
    return out


def calibration_photos(
    roots: Sequence[Path | str],
    count: int,
    val_fraction: float = 0.2,
    val_salt: str = "fashionkp",
    categories: Sequence[str] | None = None,
) -> list[Path]:
    """``count`` training photos of FashionAI split folders (of ``categories``, or all garment types), spread
    evenly over them; never validation photos (training's split rule), so that NE measured afterwards is honest."""
    records = read_splits(list(roots), categories, missing_images="skip")
    train = split_records(records, val_fraction, val_salt)[0] if val_fraction else records
    if not train:
        raise ConfigError("calibration_root", [str(r) for r in roots], "holds no training photos")
    picks = np.linspace(0, len(train) - 1, min(count, len(train))).round().astype(int)
    return [train[i].image_path for i in sorted(set(picks))]


def record_path(checkpoint: Path | str) -> Path:
    """Where ``fashionkp precision`` records its measurements of a checkpoint: beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.name}.precision.json")


def choose(figures: dict[str, dict[str, float]], tolerance: float = NE_TOLERANCE) -> str:
    """The fastest precision whose NE (percent) is within ``tolerance`` points of fp32's."""
    limit = figures["fp32"]["ne"] + tolerance
    fits = [p for p, f in figures.items() if f["ne"] <= limit]
    return min(fits, key=lambda p: figures[p]["ms_per_image"])


def recorded_int8_file(record: dict | None) -> Path | None:
    """The int8 file a record's measurement was made with, where it still exists (it lives in a cache)."""
    path = Path(record["int8_onnx"]) if record and record.get("int8_onnx") else None
    return path if path is not None and path.is_file() else None


def recorded_choice(checkpoint: Path | str) -> dict | None:
    """The measured choice of a checkpoint (``fashionkp precision``), if one was recorded for this file."""
    path = record_path(checkpoint)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    stat = Path(checkpoint).stat()
    if record.get("checkpoint_size") != stat.st_size:
        log.warning("%s was measured on another version of %s: ignored", path, checkpoint)
        return None
    if record.get("int8_scheme", 1) != INT8_SCHEME:
        log.warning("%s measured an older int8 (it quantized padding amounts): ignored; run `fashionkp precision`"
                    " again", path)  # fmt: skip
        return None
    return record
