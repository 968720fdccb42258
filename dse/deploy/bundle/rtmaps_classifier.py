"""RTMaps Python component: one image in, its class id, class name and class probabilities out.

Load this file in RTMaps Studio's Python component (see README.md). It runs this bundle's ONNX model
with ONNX Runtime on the CPU and imports predict.py for the sha256 check and the preprocessing, so it
classifies an image exactly as `python predict.py` does. Nothing here imports torch or dse.

Inputs      image       IPL_IMAGE (RGB, BGR or grey, any size: centred crop and area resize)
Outputs     class_id    INTEGER64, the most probable class
            label       its name (string)
            scores      FLOAT64 vector, the probability of every class (softmax of the logits)
Properties  bundle      folder of the bundle (default: this file's folder)
            precision   fp32 (model.onnx) or int8 (model.int8.onnx)
            channel_order  auto (the image's own channel sequence), RGB or BGR
            threads     ONNX Runtime intra-op threads
Every output carries the timestamp of the image it was computed from.
"""

import json
import os
import sys

import numpy as np
import rtmaps.core as rt
import rtmaps.types
from rtmaps.base_component import BaseComponent

try:
    HERE = os.path.dirname(os.path.abspath(__file__))
except NameError:  # an embedding that runs the file without __file__: the bundle is the working folder
    HERE = os.getcwd()
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import predict  # noqa: E402  (the bundle's runtime: the same checks and preprocessing as predict.py)

PRECISIONS = ("fp32", "int8")
ORDERS = ("auto", "RGB", "BGR")


def _enum(options, default=0) -> str:
    """An RTMaps ENUM property value: 'count|default index|option|option...'."""
    return "|".join([str(len(options)), str(default)] + list(options))


class rtmaps_python(BaseComponent):
    def __init__(self):
        BaseComponent.__init__(self)
        self.session = None
        self.meta = None

    def Dynamic(self):
        self.add_input("image", rtmaps.types.IPL_IMAGE)
        self.add_property("bundle", HERE)
        self.add_property("precision", _enum(PRECISIONS), rtmaps.types.ENUM)
        self.add_property("channel_order", _enum(ORDERS), rtmaps.types.ENUM)
        self.add_property("threads", 1)
        self.add_output("class_id", rtmaps.types.INTEGER64)
        self.add_output("label", rtmaps.types.AUTO, 256)
        self.add_output("scores", rtmaps.types.FLOAT64, self._num_classes())

    def _num_classes(self) -> int:
        """The scores buffer size, read from meta.json at design time (checked again in Birth)."""
        try:
            with open(os.path.join(self.properties["bundle"].data, predict.META), encoding="utf-8") as f:
                return len(json.load(f)["classes"])
        except (OSError, KeyError, ValueError):
            return 1000

    def Birth(self):
        folder = self.properties["bundle"].data
        precision = PRECISIONS[self.properties["precision"].data]
        threads = int(self.properties["threads"].data)
        try:
            self.meta = predict.verify(folder)
            self.session = predict.open_session(folder, precision, threads, meta=self.meta)
        except predict.BundleError as e:
            rt.report_error("rtmaps_classifier: %s" % e)
            raise
        rt.report_info(
            "rtmaps_classifier: %s, %s, %d thread(s), from %s" % (self.meta["paper_name"], precision, threads, folder)
        )

    def Core(self):
        element = self.inputs["image"].ioelt
        frame = element.data
        order = ORDERS[self.properties["channel_order"].data]
        if order == "auto":  # the image's own channel sequence, e.g. BGR from a camera driver
            order = getattr(frame, "channel_seq", "") or "RGB"
        x = predict.to_model_input(np.asarray(frame.image_data), self.meta, order)
        probs = predict.softmax(predict.run(self.session, x))[0]
        best = int(np.argmax(probs))
        for name, value in (
            ("class_id", best),
            ("label", self.meta["classes"][best]),
            ("scores", probs.astype(np.float64)),
        ):
            out = rtmaps.types.Ioelt()
            out.data = value
            out.ts = element.ts
            self.outputs[name].write(out)

    def Death(self):
        self.session = None
        self.meta = None
