"""The SSD detector: Gluon networks and presets (network.py) and its model kind (kind.py)."""
