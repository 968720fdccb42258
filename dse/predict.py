"""Latency predictors per target: features of an architecture's ONNX graph, a model fitted on the architectures a
kit timed on that target, its held-out error, and predictions for the architectures the kit did not time.

The model. With one intra-op thread, ONNX Runtime runs a compact CNN's nodes one after the other, so its latency is
a sum over nodes of (a fixed cost per node: dispatch, memory set-up) + (work x a rate of that node's kernel). Summed
per op type, that is a linear function of a few graph features with non-negative coefficients: MACs of 1x1
convolutions and of wider kernels (im2col + GEMM, at different rates), output elements of convolutions (per-pixel
overhead that MACs miss at small widths), of each activation (ELU's exp costs several times ReLU's max), of
BatchNorm, Add and pooling, and node counts per op type (ONNX Runtime fuses a Conv and the ReLU after it into one
node, not an ELU: a ReLU node costs no dispatch of its own where an ELU node does). So the predictor is
scikit-learn's `LinearRegression(positive=True)` (non-negative least squares) over these features:

- it has the form of the cost it models, so its coefficients read as ms per MMAC or per node, and it extrapolates
  to widths and depths outside the calibration set, where a tree model would predict a constant;
- it has some fifteen coefficients: a calibration set of a few dozen timed architectures fits it;
- non-negativity keeps correlated features (MACs and elements grow together with width) from cancelling with
  opposite signs, which is what makes unregularised least squares overfit a few dozen points;
- it minimises the squared relative error (each architecture weighted by 1/latency^2): latencies of one space span
  two orders of magnitude, and plain least squares would fit the largest models and miss the small ones by tens of
  per cent (the +-10 % goal is relative too).

A per-layer lookup summed (nn-Meter's kernels) needs every distinct layer timed alone; this model takes the
architectures the kit already times, at the price of assuming the per-op rates do not depend on the layer's shape
beyond the MACs/elements split. The held-out error (k-fold, every architecture predicted by a fit without it) says
how far that assumption holds on each target; `bench/latency_predictor.py` measures it against naive predictors
(MACs, params)."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # onnx, scipy and scikit-learn are imported where used: 3 s that every sweep process would pay
    import onnx
    from sklearn.linear_model import LinearRegression

from dse.latency import build
from dse.onnx import export_onnx

__all__ = ["FEATURES", "Fitted", "graph_features", "spec_features", "fit", "held_out", "within"]

ACTIVATIONS = ("Relu", "Elu")
COUNTED = {"Relu": "count_relu", "Elu": "count_elu", "BatchNormalization": "count_bn", "Add": "count_add"}
FEATURES = (
    "macs_conv1x1",
    "macs_convk",
    "macs_gemm",
    "elems_conv",
    "elems_relu",
    "elems_elu",
    "elems_bn",
    "elems_add",
    "elems_pool",
    "count_conv",
    *COUNTED.values(),
    "count_other",
    "input_elems",
)
WITHIN = 0.10  # the share of predictions within +-10 % is the figure the issue asks of a predictor


def _numel(shape) -> int:
    return math.prod(d.dim_value if d.dim_value > 0 else 1 for d in shape.dim)  # a dynamic batch axis counts 1


def graph_features(model: onnx.ModelProto) -> dict[str, float]:
    """FEATURES of an fp32 ONNX graph at batch 1 (shapes by ONNX shape inference), and its MACs."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: v.type.tensor_type.shape for v in [*inferred.graph.value_info, *inferred.graph.output]}
    shapes.update({v.name: v.type.tensor_type.shape for v in inferred.graph.input})
    weights = {w.name: list(w.dims) for w in model.graph.initializer}
    out = dict.fromkeys(FEATURES, 0.0)
    out["input_elems"] = float(_numel(model.graph.input[0].type.tensor_type.shape))
    for node in model.graph.node:
        elems = float(_numel(shapes[node.output[0]]))
        if node.op_type == "Conv":
            c_out, c_in_per_group, *kernel = weights[node.input[1]]
            macs = elems * c_in_per_group * math.prod(kernel)
            out["macs_conv1x1" if math.prod(kernel) == 1 else "macs_convk"] += macs
            out["elems_conv"] += elems
            out["count_conv"] += 1
            continue
        out[COUNTED.get(node.op_type, "count_other")] += 1
        if node.op_type == "Gemm":
            out["macs_gemm"] += elems * weights[node.input[1]][1]
        elif node.op_type in ACTIVATIONS:
            out[f"elems_{node.op_type.lower()}"] += elems
        elif node.op_type == "BatchNormalization":
            out["elems_bn"] += elems
        elif node.op_type == "Add":
            out["elems_add"] += elems
        elif "Pool" in node.op_type:
            out["elems_pool"] += float(_numel(shapes[node.input[0]]))
    out["macs"] = out["macs_conv1x1"] + out["macs_convk"] + out["macs_gemm"]  # the naive predictor's feature
    return out


def _load(path: Path) -> onnx.ModelProto:
    import onnx

    return onnx.load(path)


def spec_features(spec: Mapping) -> dict[str, float]:
    """FEATURES of an architecture spec, from its fp32 ONNX export (random weights), plus its params and MACs (the
    naive predictors' single features)."""
    model, shape = build(spec)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model.eval(), path, shape)
        features = graph_features(_load(path))
    features["params"] = float(sum(p.numel() for p in model.parameters()))
    return features


@dataclass
class Fitted:
    """A latency model of one metric on one target: the regression, the features it reads, and its held-out
    predictions of the architectures it was fitted on (by k-fold; the figures say how far to trust it)."""

    metric: str
    features: tuple[str, ...]
    model: LinearRegression
    held_out: pd.DataFrame  # index: architecture; measured, predicted

    def predict(self, features: pd.DataFrame) -> pd.Series:
        """Predicted ms per row of `features` (one architecture per row)."""
        return pd.Series(self.model.predict(features[list(self.features)].to_numpy()), index=features.index)

    def summary(self) -> str:
        """One line: held-out share within +-10 %, median and worst absolute error, Spearman rank correlation."""
        h = self.held_out
        error = (h["predicted"] / h["measured"] - 1).abs()
        from scipy.stats import spearmanr

        rho = spearmanr(h["measured"], h["predicted"]).statistic
        return (
            f"{self.metric}: held-out ({len(h)} architectures, {_folds(len(h))}-fold) within +-10 %: "
            f"{100 * within(h):.0f} %, median |error| {100 * error.median():.1f} %, worst {100 * error.max():.1f} %, "
            f"Spearman {rho:.3f}"
        )


def _folds(n: int) -> int:
    return min(5, n)


def within(table: pd.DataFrame, share: float = WITHIN) -> float:
    """The share of rows whose `predicted` lies within +-`share` of `measured`."""
    return float(((table["predicted"] / table["measured"] - 1).abs() <= share).mean())


def fit(features: pd.DataFrame, measured: pd.Series, metric: str, *, columns=FEATURES) -> Fitted:
    """Fit the latency model of `metric` on measured architectures (rows of `features` by architecture, `measured`
    ms by the same index), with its k-fold held-out predictions. Needs at least 3 architectures."""
    if len(measured) < 3:
        raise ValueError(f"{metric}: {len(measured)} measured architecture(s); a predictor needs at least 3")
    x = features.loc[measured.index, list(columns)].to_numpy(dtype=float)
    y = measured.to_numpy(dtype=float)
    if not (np.isfinite(y).all() and (y > 0).all()):
        raise ValueError(f"{metric}: measured latencies must be positive finite numbers")
    weight = 1 / y**2  # least squares on the relative error: latencies span 100x, the +-10 % goal is relative
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import KFold, cross_val_predict

    folds = KFold(_folds(len(y)), shuffle=True, random_state=0)
    predicted = cross_val_predict(LinearRegression(positive=True), x, y, cv=folds, params={"sample_weight": weight})
    model = LinearRegression(positive=True)
    held_out = pd.DataFrame({"measured": y, "predicted": predicted}, index=measured.index)
    return Fitted(metric, tuple(columns), model.fit(x, y, sample_weight=weight), held_out)


def held_out(fitted: Fitted, features: pd.DataFrame, measured: pd.Series) -> pd.DataFrame:
    """Predicted vs measured on architectures the model was not fitted on."""
    return pd.DataFrame({"measured": measured, "predicted": fitted.predict(features.loc[measured.index])})
