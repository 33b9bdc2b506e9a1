"""A ROS bag's image topic as a camera source (`mas3-edge run --camera drive_bag/?topic=/cam`).

Frames come in recording order, stamped with their `header.stamp` (the frame's capture_ns),
paced at the topic's mean recorded rate unless --fps says otherwise; --loop rewinds. A message
that does not decode is a warning and a skipped frame; a file damaged part-way ends the stream
with a warning. What cannot be opened at all (no rosbags, a truncated
index, no or an unknown image topic, an unsupported encoding in the first frame) is a UserError.
"""
from __future__ import annotations

import logging

from mas3_edge.bags import Bag
from mas3_edge.errors import UserError

log = logging.getLogger(__name__)
OK, BAD, END = "ok", "bad", "end"  # the readers' statuses (runtime/sources.py)


class BagReader:
    live, bgr = False, False  # a recording, decoded to RGB by mas3_edge.bags
    recorded = True  # capture_ns is the recorded stamp, not a time on this clock

    def __init__(self, source: str):
        self.bag = Bag(source)
        self.fps = self.bag.fps
        self._frames = self.bag.frames()
        try:
            self._first = next(self._frames, None)
        except UserError:
            self.bag.close()
            raise
        if self._first is None or self._first[1] is None:
            self.bag.close()
            why = self._first[2] if self._first else f"topic {self.bag.topic} has no messages"
            raise UserError(f"{self.bag.path}: {why}")

    def read(self):
        """(status, RGB image, label, capture_ns) as the camera's other readers; capture_ns = header.stamp."""
        item, self._first = self._first or self._next(), None
        if item is None:
            return END, None, None, 0
        stamp, rgb, why = item
        if rgb is None:
            log.warning("bag %s: skipping a frame: %s", self.bag.path, why)
            return BAD, None, None, stamp
        return OK, rgb, None, stamp

    def _next(self):
        try:
            return next(self._frames, None)
        except UserError as e:  # a damaged tail ends the recording; what came before was served
            log.warning("%s; ending the stream here", e)
            return None

    def rewind(self) -> bool:
        self._frames, self._first = self.bag.frames(), None
        return True

    def close(self) -> None:
        self.bag.close()
