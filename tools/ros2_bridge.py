"""Republish the segmentation stream as ROS 2 topics: a small rclpy node.

    source /opt/ros/humble/setup.bash           # rclpy and sensor_msgs come with ROS 2, not from PyPI
    pip install "mas3-edge[ros]"                 # into the same Python
    mas3-edge run --camera 0 &                   # the stream, tcp://127.0.0.1:5555
    python tools/ros2_bridge.py                  # then: ros2 topic echo /mas3/info, rviz2, foxglove_bridge
    python tools/ros2_bridge.py --address tcp://127.0.0.1:5556 --frame-id front_camera \\
        --ros-args -r /mas3/classes:=/front/segmentation            # ROS remapping works as usual

Topics, types and stamps are the recorder's (runtime/ros.py, one conversion for both):
/mas3/classes sensor_msgs/Image mono8 (train ids), /mas3/overlay sensor_msgs/CompressedImage
(JPEG), /mas3/confidence sensor_msgs/Image mono8 (when `run --confidence`), /mas3/info
std_msgs/String JSON (model version, label set; latched: transient-local, so a late subscriber
gets it). header.stamp is the frame's capture time; header.frame_id is --frame-id, else the
stream's camera id.

rclpy is imported inside main() only, so this file imports without ROS and `to_rclpy` is tested
with stand-in message classes (tests/test_record.py). The rclpy glue itself has NOT been run: no
ROS 2 install was available where it was written. Treat it as a starting point and check it on a
ROS 2 machine (`ros2 topic hz /mas3/classes`).
"""
from __future__ import annotations

import argparse
import array

import numpy as np

from mas3_edge.runtime import ros


def to_rclpy(rm: ros.RosMessage, classes: dict):
    """A RosMessage as an instance of its rclpy class (`classes`: ROS 2 type name -> message class)."""
    msg = classes[rm.msgtype]()
    if hasattr(msg, "header"):
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(rm.stamp_ns, 1_000_000_000)
        msg.header.frame_id = rm.frame_id
    for name, value in rm.fields.items():
        # rclpy takes uint8[] fastest as array('B'); a numpy array would be checked element by element
        setattr(msg, name, array.array("B", value.tobytes()) if isinstance(value, np.ndarray) else value)
    return msg


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default="tcp://127.0.0.1:5555", help="the stream (mas3-edge run --publish)")
    p.add_argument("--topic", default="mas3/seg", help="the stream's topic prefix")
    p.add_argument("--frame-id", default=None, help="header.frame_id (default: the stream's camera id)")
    p.add_argument("--latest-only", action="store_true", help="republish only the newest message (ZMQ CONFLATE)")
    args, ros_args = p.parse_known_args(argv)
    try:
        import rclpy
        from rclpy.qos import DurabilityPolicy, QoSProfile
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String
    except ImportError:
        raise SystemExit("error: the bridge needs ROS 2 (rclpy): source /opt/ros/<distro>/setup.bash first") from None
    from mas3_edge.runtime.subscriber import Subscriber

    rclpy.init(args=["ros2_bridge", *ros_args])
    node = rclpy.create_node("mas3_bridge")
    classes = {ros.IMAGE: Image, ros.COMPRESSED: CompressedImage, ros.STRING: String}
    latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    pubs = {topic: node.create_publisher(classes[ros.TYPES[key]], topic, latched if key == "info" else 5)
            for key, topic in ros.TOPICS.items()}
    conv = ros.Converter(args.frame_id)
    node.get_logger().info(f"republishing {args.address} on {', '.join(ros.TOPICS.values())}")
    with Subscriber(args.address, args.topic, latest_only=args.latest_only) as sub:
        try:
            while rclpy.ok():
                msg = sub.recv(timeout=0.5)
                for rm in conv.convert(msg) if msg is not None else ():
                    pubs[rm.topic].publish(to_rclpy(rm, classes))
        except KeyboardInterrupt:
            pass
        finally:
            node.destroy_node()
            rclpy.try_shutdown()


if __name__ == "__main__":
    main()
