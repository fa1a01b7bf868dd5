"""The convolutional VAE: Gluon network (network.py) and its model kind (kind.py)."""
