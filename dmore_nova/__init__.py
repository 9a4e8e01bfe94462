"""dmore-nova: out-of-band VNC consoles that stay connected through live migration."""

__version__ = "0.1.0"
