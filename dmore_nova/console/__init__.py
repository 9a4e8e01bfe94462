"""The console proxy: the path from the user's browser to the RM VM (the paper's VNC client
side).  noVNC over websockify; sessions survive the RM endpoint changing (see proxy.py for the
I/O and rfb_splice.py for the sans-IO RFB splice that hides the re-handshake)."""
