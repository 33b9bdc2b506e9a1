"""Write a small ROS bag of synthetic driving scenes, to try the bag paths without a robot.

    python tools/make_bag.py drive_bag --domain night --frames 60 --fps 10             # ROS 2, sqlite3
    python tools/make_bag.py drive_mcap --storage mcap --compressed                    # ROS 2, MCAP, JPEG
    python tools/make_bag.py drive.bag --storage ros1 --topic /usb_cam/image_raw       # ROS 1

The bag has the camera topic (sensor_msgs/Image rgb8, or CompressedImage JPEG with --compressed)
and an unrelated std_msgs/String topic, as a real recording has more than images. Written with
rosbags, so it needs `pip install "mas3-edge[ros]"` and no ROS install. `write_bag` is also what
tests/test_bags.py writes its bags with.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mas3_edge.runtime import ros

STORAGES = ("sqlite3", "mcap", "ros1")


def write_bag(path: str | Path, messages: Iterable[ros.RosMessage], storage: str = "sqlite3") -> Path:
    """Write RosMessages (runtime/ros.py) to a ROS 2 bag folder (sqlite3 or mcap) or a ROS 1 .bag file."""
    from rosbags.typesys import Stores, get_typestore
    path = Path(path)
    if storage == "ros1":
        from rosbags.rosbag1 import Writer
        store, writer, serialize = get_typestore(Stores.ROS1_NOETIC), Writer(path), "serialize_ros1"
    else:
        from rosbags.rosbag2 import StoragePlugin, Writer
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        store, serialize = get_typestore(Stores.ROS2_HUMBLE), "serialize_cdr"
        writer = Writer(path, version=9, storage_plugin=plugin)
    conns = {}
    with writer:
        for rm in messages:
            if rm.topic not in conns:
                conns[rm.topic] = writer.add_connection(rm.topic, rm.msgtype, typestore=store)
            data = getattr(store, serialize)(ros.build(store, rm), rm.msgtype)
            writer.write(conns[rm.topic], rm.stamp_ns, data)
    return path


def jpeg(topic: str, stamp_ns: int, rgb: np.ndarray, frame_id: str = "camera") -> ros.RosMessage:
    import cv2
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return ros.RosMessage(topic, ros.COMPRESSED, stamp_ns, {"format": "jpeg", "data": buf.reshape(-1)}, frame_id)


def scenes(args: argparse.Namespace) -> Iterable[ros.RosMessage]:
    from mas3_edge import synth
    t0 = 1_700_000_000_000_000_000  # a fixed start: the same bag every time
    for i in range(args.frames):
        stamp = t0 + round(i * 1e9 / args.fps)
        rgb, _ = synth.render(args.domain, synth.scene_seed(args.seed, i), (args.height, args.width))
        yield jpeg(args.topic, stamp, rgb) if args.compressed else ros.image(args.topic, stamp, "camera", rgb, "rgb8")
        yield ros.RosMessage("/rosout_note", ros.STRING, stamp, {"data": f"frame {i}"})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the bag to write (a folder for ROS 2, a .bag file for ROS 1)")
    p.add_argument("--storage", choices=STORAGES, default="sqlite3")
    p.add_argument("--domain", default="night", help="synthetic domain: synthetic, realistic, night, fog, rain")
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--topic", default="/camera/image_raw")
    p.add_argument("--compressed", action="store_true", help="sensor_msgs/CompressedImage (JPEG)")
    args = p.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; pick a new name")
    write_bag(args.out, scenes(args), args.storage)
    print(f"wrote {args.out}: {args.frames} frames on {args.topic} at {args.fps:g} fps ({args.storage})")


if __name__ == "__main__":
    main()
