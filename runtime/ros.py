"""The segmentation stream as ROS 2 messages: one conversion for the MCAP recorder (runtime/record.py)
and the rclpy bridge (tools/ros2_bridge.py).

One stream message (runtime.wire.Message) becomes, all on `header.stamp` = its capture_ns:

    /mas3/classes     sensor_msgs/msg/Image mono8           class ids (and the label set's ignore id)
    /mas3/overlay     sensor_msgs/msg/CompressedImage jpeg  the colour overlay, when sent
    /mas3/confidence  sensor_msgs/msg/Image mono8           confidence * 255, when sent
    /mas3/info        std_msgs/msg/String                   JSON: model version, engine, label set with
                                                            its names and colours when the reader knows
                                                            it, else a note saying it does not (first
                                                            message and on every change)

`RosMessage.fields` holds the message's fields without its header, so each consumer builds its own
kind of object: rosbags dataclasses serialized to CDR (`to_cdr`), or rclpy messages in the bridge.
Nothing here imports ROS or rosbags at module level.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

IMAGE, COMPRESSED, STRING = "sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage", "std_msgs/msg/String"
TOPICS = {"classes": "/mas3/classes", "overlay": "/mas3/overlay", "confidence": "/mas3/confidence",
          "info": "/mas3/info"}
TYPES = {"classes": IMAGE, "overlay": COMPRESSED, "confidence": IMAGE, "info": STRING}


@dataclass
class RosMessage:
    topic: str
    msgtype: str  # ROS 2 name, e.g. sensor_msgs/msg/Image
    stamp_ns: int  # header.stamp (and the MCAP log time); the stream's capture_ns
    fields: dict = field(default_factory=dict)  # everything but the header; uint8[] as numpy arrays
    frame_id: str = ""  # header.frame_id; "" for messages without a header (String)


def info_json(msg, book=None) -> str:
    """What a consumer needs to read the class map: version, engine, label set, with its names, colours
    and ignore id when `book` (a subscriber.LabelBook; default: Cityscapes-19 only) knows it, else a
    `labels_note` that says it does not."""
    if book is None:
        from .subscriber import LabelBook
        book = LabelBook()
    info = {"model_version": msg.version, "engine": msg.engine, "label_set": msg.label_set,
            "num_classes": msg.num_classes, "camera_id": getattr(msg, "camera_id", ""),
            "wire_version": getattr(msg, "wire_version", None)}
    found = book.find(msg.label_set, msg.num_classes)
    if found is not None:
        info |= {"classes": list(found.names), "palette": [list(c) for c in found.palette], "ignore": found.ignore}
    else:
        info["labels_note"] = book.unknown_note(msg.label_set, msg.num_classes)
    return json.dumps(info)


def image(topic: str, stamp_ns: int, frame_id: str, array: np.ndarray, encoding: str = "mono8") -> RosMessage:
    """A sensor_msgs/Image of an (H, W) or (H, W, C) uint8/uint16 array (little-endian, no row padding)."""
    array = np.ascontiguousarray(array)
    h, w = array.shape[:2]
    data = array.astype(array.dtype.newbyteorder("<")).view(np.uint8).reshape(-1)
    return RosMessage(topic, IMAGE, stamp_ns, {"height": h, "width": w, "encoding": encoding, "is_bigendian": 0,
                                               "step": data.size // h, "data": data}, frame_id)


class Converter:
    """Stream messages -> ROS 2 messages; remembers what /mas3/info last said, to repeat it only on change."""

    def __init__(self, frame_id: str | None = None, book=None):
        from .subscriber import LabelBook
        self.frame_id = frame_id  # None: the message's camera id, else "camera"
        self.book = book or LabelBook()  # the label sets whose names and colours /mas3/info carries
        self._info: str | None = None

    def convert(self, msg) -> list[RosMessage]:
        stamp = int(msg.capture_ns)
        frame = self.frame_id or getattr(msg, "camera_id", "") or "camera"
        out = []
        info = info_json(msg, self.book)
        if info != self._info:
            self._info = info
            out.append(RosMessage(TOPICS["info"], STRING, stamp, {"data": info}))
        out.append(image(TOPICS["classes"], stamp, frame, msg.classes.astype(np.uint8, copy=False)))
        if msg.overlay_jpeg:
            out.append(RosMessage(TOPICS["overlay"], COMPRESSED, stamp,
                                  {"format": "jpeg", "data": np.frombuffer(msg.overlay_jpeg, np.uint8)}, frame))
        if msg.confidence is not None:  # the wire quantises to 1/255: mono8 loses nothing more
            conf = np.clip(np.rint(msg.confidence * 255.0), 0, 255).astype(np.uint8)
            out.append(image(TOPICS["confidence"], stamp, frame, conf))
        return out


# ---------------------------------------------------------------- rosbags: CDR bytes and schemas

def typestore():
    """rosbags' ROS 2 Humble types (sensor_msgs and std_msgs are the same in every ROS 2 release since)."""
    from rosbags.typesys import Stores, get_typestore
    return get_typestore(Stores.ROS2_HUMBLE)


def schema(store, msgtype: str) -> bytes:
    """The `ros2msg` schema text MCAP readers (Foxglove, rosbag2) decode the CDR with."""
    return store.generate_msgdef(msgtype, ros_version=2)[0].encode()


def build(store, rm: RosMessage):
    """The rosbags message object of a RosMessage (a ROS 1 typestore gets its Header's seq = 0)."""
    types = store.types
    kwargs = dict(rm.fields)
    if "header" in types[rm.msgtype].__dataclass_fields__:
        sec, nsec = divmod(rm.stamp_ns, 1_000_000_000)
        header = types["std_msgs/msg/Header"]
        extra = {"seq": 0} if "seq" in header.__dataclass_fields__ else {}
        stamp = types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec)
        kwargs["header"] = header(stamp=stamp, frame_id=rm.frame_id, **extra)
    return types[rm.msgtype](**kwargs)


def to_cdr(store, rm: RosMessage) -> bytes:
    """A RosMessage serialized as ROS 2 CDR (little-endian), what `ros2 bag record` stores."""
    return bytes(store.serialize_cdr(build(store, rm), rm.msgtype))
