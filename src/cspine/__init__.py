"""cspine: cervical spine fracture detection on CT."""

__version__ = "0.1.0"
