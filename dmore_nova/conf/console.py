"""[console]: the console proxy (noVNC/websockify) in front of the RM VMs."""

from __future__ import annotations

from oslo_config import cfg

GROUP = cfg.OptGroup("console", title="Console proxy (noVNC over websockify) in front of RM VMs")

OPTS = [
    cfg.HostAddressOpt("listen", default="127.0.0.1",
                       help="Address the console proxy listens on (HTTP and websockets)."),
    cfg.PortOpt("port", default=6080, help="TCP port of the console proxy."),
    cfg.StrOpt("novnc_root", default="/usr/share/novnc",
               help="Directory of noVNC (the one holding core/rfb.js), served under /novnc/ "
                    "for the console page at /console.html."),
    cfg.StrOpt("token_plugin", default="dmore_nova.console.token_plugins.JSONTokenFile",
               help="Class (dotted path) that maps console tokens to RM endpoints; a "
                    "dmore_nova.console.token_plugins.TargetPlugin."),
    cfg.StrOpt("token_source",
               help="Argument of the token plugin (JSONTokenFile: the token file's path)."),
    cfg.FloatOpt("reattach_timeout", default=60.0, min=0.0, max=3600.0,
                 help="Seconds a browser session waits for its RM endpoint to come back "
                      "(looked up again through the token plugin) before it is closed."),
    cfg.FloatOpt("reattach_backoff_max", default=1.0, min=0.01, max=60.0,
                 help="Longest pause between two re-attach attempts (seconds); attempts start "
                      "50 ms apart and double."),
    cfg.FloatOpt("connect_timeout", default=10.0, min=0.1, max=600.0,
                 help="Seconds for one attempt: TCP connect plus the RM's RFB handshake."),
    cfg.FloatOpt("handshake_timeout", default=30.0, min=1.0, max=600.0,
                 help="Seconds a browser has to finish its RFB handshake."),
    cfg.IntOpt("max_connections", default=256, min=1, max=65536,
               help="HTTP connections (websockets included) served at once; more get 503."),
    cfg.IntOpt("max_pending_input", default=256 << 10, min=1024, max=64 << 20,
               help="Bytes of browser input queued while a session re-attaches; more closes "
                    "that session (input is never dropped silently)."),
    cfg.IntOpt("max_cut_text", default=1 << 20, min=0, max=1 << 26,
               help="Largest clipboard text accepted from a browser (bytes); it also bounds "
                    "websocket messages."),
    cfg.IntOpt("max_held_message", default=64 << 20, min=4096, max=1 << 30,
               help="Largest RFB rectangle or message held until complete; larger ones are "
                    "streamed and a cut inside one cannot be resumed."),
    cfg.IntOpt("max_buffer", default=8 << 20, min=64 << 10, max=1 << 30,
               help="Bytes queued towards one side of a session before reading from the "
                    "other side pauses (backpressure)."),
    cfg.StrOpt("cert_file",
               help="PEM certificate for https/wss (noVNC encrypts only through wss://: its "
                    "VeNCrypt supports no TLS). Unset: plain http/ws, for use behind a TLS "
                    "terminating front end."),
    cfg.StrOpt("key_file", help="PEM private key of cert_file (if not inside it)."),
    cfg.ListOpt("allowed_origins", default=[],
                help="Host names a browser page may come from (Origin header), besides the "
                     "proxy's own."),
    cfg.ListOpt("control_hosts", default=["127.0.0.1", "::1"],
                help="Client addresses allowed to POST /reattach?token=... or ?key=... (the "
                     "orchestrator telling the proxy an RM VM moved)."),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(GROUP)
    conf.register_opts(OPTS, group=GROUP)
