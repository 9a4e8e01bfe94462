"""[rfb]: the RM VM's VNC (RFB) server."""

from __future__ import annotations

from oslo_config import cfg, types

GROUP = cfg.OptGroup("rfb", title="RFB (VNC) server in the RM VM")

OPTS = [
    cfg.HostAddressOpt("listen", default="127.0.0.1",
                       help="Address the RFB server listens on."),
    cfg.PortOpt("port", default=5900, help="TCP port of the RFB server."),
    cfg.StrOpt("password_file",
               help="File holding the VNC password (first line; at most 8 bytes are used, as in "
                    "RFB VNC Authentication) and optionally a view-only password (second line: "
                    "viewers that give it see the screen but their input is ignored). When set, "
                    "VNC Authentication is offered."),
    cfg.ListOpt("security_types", item_type=types.String(choices=[
                    "none", "vnc", "vencrypt-plain", "vencrypt-tlsnone", "vencrypt-x509none",
                    "vencrypt-x509vnc"]),
                default=["none", "vnc"],
                help="Security types offered, in order. 'vnc' is offered only with a password; "
                     "x509 types need tls_cert_file/tls_key_file; 'vencrypt-plain' needs "
                     "plain_users_file."),
    cfg.StrOpt("tls_cert_file", help="PEM certificate for VeNCrypt X509* types."),
    cfg.StrOpt("tls_key_file", help="PEM private key for VeNCrypt X509* types."),
    cfg.StrOpt("plain_users_file",
               help="File of 'user:password' lines for VeNCrypt Plain."),
    cfg.IntOpt("max_viewers", default=16, min=1, max=1024,
               help="Connections served at once; more are refused with a reason."),
    cfg.IntOpt("max_cut_text", default=1 << 20, min=0, max=1 << 26,
               help="Largest ClientCutText accepted (bytes); larger closes the connection."),
    cfg.IntOpt("max_write_buffer", default=4 << 20, min=64 << 10, max=1 << 30,
               help="Per-viewer output bytes queued before that viewer stops getting updates "
                    "until it drains (backpressure: a slow viewer never stalls the others)."),
    cfg.IntOpt("handshake_timeout", default=30, min=1,
               help="Seconds a client has to finish the RFB handshake."),
    cfg.BoolOpt("view_only", default=False, help="Ignore input from every viewer."),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(GROUP)
    conf.register_opts(OPTS, group=GROUP)
