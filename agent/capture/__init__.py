"""The device side of the data flywheel: frames the model is unsure about, kept for labelling.

``settings`` (the ``capture:`` section), ``rules`` (which results keep their frame, and the
rate and byte budgets), ``capture`` (the sink on the loop that hands kept frames to its own
thread, which crops, encodes and queues them for the fleet link in pieces).
"""

from edgefleet.capture.capture import Capture, SampleLink
from edgefleet.capture.settings import CaptureSettings

__all__ = ["Capture", "CaptureSettings", "SampleLink"]
