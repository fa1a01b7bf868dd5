"""The tile classifier: Gluon network (network.py) and its model kind (kind.py)."""
