"""Numbers of the RFB protocol, named as rfbproto (https://github.com/rfbproto/rfbproto) names them.

Only numbers live here, no behaviour: the protocol core, the encoders and the transport all import
them, so a value is spelled once.  Where implementations disagree with rfbproto (QEMU swaps the
two VeNCrypt SASL subtypes), rfbproto wins and the disagreement is noted.
"""

from __future__ import annotations

from typing import Final

# -- protocol versions (rfbproto 7.1.1) -------------------------------------------------------
#: The ProtocolVersion message is exactly this long: b"RFB xxx.yyy\n".
PROTOCOL_VERSION_LEN: Final = 12
RFB_VERSION_3_3: Final = (3, 3)
RFB_VERSION_3_7: Final = (3, 7)
RFB_VERSION_3_8: Final = (3, 8)

# -- security types (rfbproto 7.1.2, 7.2) -----------------------------------------------------
SEC_INVALID: Final = 0
SEC_NONE: Final = 1
SEC_VNC_AUTH: Final = 2
SEC_RA2: Final = 5
SEC_RA2NE: Final = 6
SEC_TIGHT: Final = 16
SEC_ULTRA: Final = 17
SEC_TLS: Final = 18
SEC_VENCRYPT: Final = 19
SEC_SASL: Final = 20

#: SecurityResult status words (rfbproto 7.1.3).
SECURITY_RESULT_OK: Final = 0
SECURITY_RESULT_FAILED: Final = 1
SECURITY_RESULT_TOO_MANY: Final = 2  # only with the Tight security type

#: VNC Authentication challenge/response length (rfbproto 7.2.2).
VNC_AUTH_CHALLENGE_LEN: Final = 16

# -- VeNCrypt (rfbproto 7.2.19; version 0.2 only) ---------------------------------------------
VENCRYPT_VERSION: Final = (0, 2)
VENCRYPT_PLAIN: Final = 256
VENCRYPT_TLSNONE: Final = 257
VENCRYPT_TLSVNC: Final = 258
VENCRYPT_TLSPLAIN: Final = 259
VENCRYPT_X509NONE: Final = 260
VENCRYPT_X509VNC: Final = 261
VENCRYPT_X509PLAIN: Final = 262
VENCRYPT_TLSSASL: Final = 263  # QEMU numbers this 264 (swapped with X509SASL)
VENCRYPT_X509SASL: Final = 264
#: Subtypes this server implements (TLS*/X509* Plain and SASL are not).
VENCRYPT_SUPPORTED: Final = frozenset(
    {VENCRYPT_PLAIN, VENCRYPT_TLSNONE, VENCRYPT_X509NONE, VENCRYPT_X509VNC})
#: Subtypes that start a TLS session before their own authentication.
VENCRYPT_TLS_ANON: Final = frozenset({VENCRYPT_TLSNONE, VENCRYPT_TLSVNC, VENCRYPT_TLSPLAIN,
                                      VENCRYPT_TLSSASL})
VENCRYPT_TLS_X509: Final = frozenset({VENCRYPT_X509NONE, VENCRYPT_X509VNC, VENCRYPT_X509PLAIN,
                                      VENCRYPT_X509SASL})

# -- client -> server message types (rfbproto 7.5) --------------------------------------------
MSG_SET_PIXEL_FORMAT: Final = 0
MSG_SET_ENCODINGS: Final = 2
MSG_FRAMEBUFFER_UPDATE_REQUEST: Final = 3
MSG_KEY_EVENT: Final = 4
MSG_POINTER_EVENT: Final = 5
MSG_CLIENT_CUT_TEXT: Final = 6
MSG_ENABLE_CONTINUOUS_UPDATES: Final = 150
MSG_CLIENT_FENCE: Final = 248
MSG_XVP_CLIENT: Final = 250
MSG_SET_DESKTOP_SIZE: Final = 251
MSG_GII_CLIENT: Final = 253
MSG_QEMU_CLIENT: Final = 255
#: Sub-types of the QEMU client message (255), "Anthony Liguori" in rfbproto.
QEMU_EXTENDED_KEY_EVENT: Final = 0
QEMU_AUDIO: Final = 1

# -- server -> client message types (rfbproto 7.6) --------------------------------------------
MSG_FRAMEBUFFER_UPDATE: Final = 0
MSG_SET_COLOUR_MAP_ENTRIES: Final = 1
MSG_BELL: Final = 2
MSG_SERVER_CUT_TEXT: Final = 3
MSG_END_OF_CONTINUOUS_UPDATES: Final = 150
MSG_SERVER_FENCE: Final = 248
MSG_XVP_SERVER: Final = 250
MSG_QEMU_SERVER: Final = 255

# -- Fence flags (rfbproto 7.5.8) -------------------------------------------------------------
FENCE_BLOCK_BEFORE: Final = 1 << 0
FENCE_BLOCK_AFTER: Final = 1 << 1
FENCE_SYNC_NEXT: Final = 1 << 2
FENCE_REQUEST: Final = 1 << 31
#: The flags this server understands and echoes back (the Request bit is never echoed).
FENCE_SUPPORTED: Final = FENCE_BLOCK_BEFORE | FENCE_BLOCK_AFTER | FENCE_SYNC_NEXT
#: Fence payloads are at most this long (rfbproto: "length ... must not exceed 64").
FENCE_MAX_PAYLOAD: Final = 64

# -- encodings (rfbproto 7.7) -----------------------------------------------------------------
ENC_RAW: Final = 0
ENC_COPYRECT: Final = 1
ENC_RRE: Final = 2
ENC_CORRE: Final = 4
ENC_HEXTILE: Final = 5
ENC_ZLIB: Final = 6
ENC_TIGHT: Final = 7
ENC_ZLIBHEX: Final = 8
ENC_TRLE: Final = 15
ENC_ZRLE: Final = 16
ENC_ZYWRLE: Final = 17
ENC_JPEG: Final = 21
ENC_H264: Final = 50
ENC_TIGHT_PNG: Final = -260

# -- pseudo-encodings (rfbproto 7.8) ----------------------------------------------------------
#: JPEG quality level 0..9 is -32..-23; compression level 0..9 is -256..-247.
PSEUDO_QUALITY_LEVEL_0: Final = -32
PSEUDO_QUALITY_LEVEL_9: Final = -23
PSEUDO_COMPRESS_LEVEL_0: Final = -256
PSEUDO_COMPRESS_LEVEL_9: Final = -247
PSEUDO_DESKTOP_SIZE: Final = -223
PSEUDO_LAST_RECT: Final = -224
PSEUDO_POINTER_POS: Final = -232
PSEUDO_CURSOR: Final = -239
PSEUDO_X_CURSOR: Final = -240
PSEUDO_QEMU_POINTER_MOTION_CHANGE: Final = -257
PSEUDO_QEMU_EXTENDED_KEY_EVENT: Final = -258
PSEUDO_QEMU_AUDIO: Final = -259
PSEUDO_QEMU_LED_STATE: Final = -261
PSEUDO_GII: Final = -305
PSEUDO_DESKTOP_NAME: Final = -307
PSEUDO_EXTENDED_DESKTOP_SIZE: Final = -308
PSEUDO_XVP: Final = -309
PSEUDO_FENCE: Final = -312
PSEUDO_CONTINUOUS_UPDATES: Final = -313
PSEUDO_CURSOR_WITH_ALPHA: Final = -314
PSEUDO_EXTENDED_MOUSE_BUTTONS: Final = -316
PSEUDO_VMWARE_CURSOR: Final = 0x574D5664
PSEUDO_EXTENDED_CLIPBOARD: Final = -1063131698  # 0xC0A1E5CE as S32

# -- ExtendedDesktopSize reason / status codes (rfbproto 7.8.11) -------------------------------
EDS_REASON_SERVER: Final = 0
EDS_REASON_CLIENT: Final = 1
EDS_REASON_OTHER_CLIENT: Final = 2
EDS_STATUS_OK: Final = 0
EDS_STATUS_PROHIBITED: Final = 1
EDS_STATUS_OUT_OF_RESOURCES: Final = 2
EDS_STATUS_INVALID_LAYOUT: Final = 3

# -- QEMU LED state bits (rfbproto 7.8.21) ----------------------------------------------------
LED_SCROLL_LOCK: Final = 1 << 0
LED_NUM_LOCK: Final = 1 << 1
LED_CAPS_LOCK: Final = 1 << 2

#: Width/height fields are U16 on the wire; nothing larger can be described.
MAX_DIMENSION: Final = 0xFFFF
